"""Resumable training checkpoints, written atomically.

Layout: <run>/ckpt/step_00000042/{model.safetensors, config.json, trainer_state.json,
trainer_state.safetensors, meta.json} and <run>/ckpt/latest (the newest complete step folder's
name). A checkpoint is written into a temporary folder and renamed into place, and `latest` is
replaced atomically after that, so a kill, a full disk or any error at any moment leaves the
previous checkpoint intact and never a half one. Nothing is pickled (`anneal.checkpoints.state_io`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from anneal.checkpoints import state_io, write_guards

LATEST = "latest"
STATE = "trainer_state"  # <step>/trainer_state.json + .safetensors (anneal.checkpoints.state_io)


def rng_state() -> dict:
    """Every RNG the run draws from, in plain types (numpy's key array as a list) and tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, hf_config: dict,
                    trainer_state: dict, meta: dict, keep: int = 2) -> Path:
    """Write step `step` and point `latest` at it. Refuses non-finite weights (a diverged run must
    never replace a good checkpoint) and a disk without room for it; on any error mid-write the
    previous checkpoints are left as they were."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = ckpt_root / name
    weights = model.state_dict()
    bad = write_guards.first_nonfinite(weights)
    if bad is not None:
        raise write_guards.NonFiniteWeightsError(f"checkpoint of step {step}: weight {bad} is not finite; not writing it "
                                         f"(the previous checkpoints in {ckpt_root} are kept)")
    need = state_io.state_bytes(weights) + state_io.state_bytes(trainer_state)
    write_guards.ensure_free_space(ckpt_root, need, f"checkpoint of step {step}")
    tmp = ckpt_root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with write_guards.reporting_full_disk(f"checkpoint of step {step}", ckpt_root, need):
            tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "layout": "anneal-stacked"})
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
            state_io.save_state(trainer_state, tmp / STATE)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(ckpt_root / LATEST, name)
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    """Keep the newest `keep` (at least one) complete step folders."""
    keep = max(keep, 1)
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and (p / f"{STATE}.json").exists())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step_*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if (path / f"{STATE}.json").exists() or (path / f"{STATE}.pt").exists() else None


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict:
    """Load weights into `model` (strict) and return the trainer state. A model that holds only
    its rank's experts (`model.expert_range`, expert parallelism) gets its slice of the stacked
    expert tensors, which checkpoints keep whole."""
    tensors = load_file(str(path / "model.safetensors"))
    start, stop = model.expert_range
    if (start, stop) != (0, model.config.n_routed_experts):
        for name in tensors:
            if name.endswith(("mlp.experts.w_gate_up", "mlp.experts.w_down")):
                tensors[name] = tensors[name][start:stop]
    state = state_io.load_state(path / STATE)  # first: refuse a foreign pickle before touching the model
    model.load_state_dict(tensors, strict=True)
    return state


class StateDictView:
    """Something with a state_dict(): what `save_checkpoint` and the exporter read from a model,
    for weights that are not the model's own tensors (fp32 masters, experts gathered over ranks)."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd
