"""Turn a resumable training checkpoint into an HF folder (per-expert layout, bf16 by default)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from anneal.checkpoints import training_state
from anneal.errors import AnnealError
from anneal.model.dots1 import Dots1ForCausalLM
from anneal.model.config import Dots1Config


def find_step_folder(path: Path) -> Path:
    """Accept a step folder, a run's ckpt/ folder, or a run folder. Only the weights, config and
    meta JSON of the step are read (never its training state), so any step folder exports."""
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return path
    for root in (path, path / "ckpt"):
        latest = training_state.latest_checkpoint(root)
        if latest is not None:
            return latest
    raise AnnealError(f"{path}: not a training checkpoint (no model.safetensors + config.json) and no ckpt/latest inside. "
                      "Pass runs/<id>/ckpt/step_N or runs/<id>")


# Written into every export: what an anneal needs to continue from it (stage, LR, tokens seen);
# `anneal checkpoint=<folder>` starts its schedule at this LR when schedule.start_lr is null.
META_FILE = "anneal_meta.json"


def export_training_checkpoint(path: Path, out: Path, dtype: str = "bfloat16", max_shard_size: str = "2GB",
                               overwrite: bool = False) -> Path:
    from anneal.checkpoints.hf_export import export_hf_checkpoint

    step_dir = find_step_folder(path)
    cfg = Dots1Config.from_json(step_dir / "config.json")
    model = Dots1ForCausalLM(cfg)
    model.load_state_dict(load_file(str(step_dir / "model.safetensors")), strict=True)
    run_dir = step_dir.parent.parent
    tokenizer_dir = run_dir / "tokenizer"
    meta = json.loads((step_dir / "meta.json").read_text()) if (step_dir / "meta.json").exists() else {}
    export_hf_checkpoint(model, out, tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None,
                         dtype=getattr(torch, dtype), max_shard_size=max_shard_size, overwrite=overwrite,
                         extra_files={META_FILE: json.dumps(meta, indent=2)})
    return out
