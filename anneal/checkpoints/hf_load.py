"""Load a Hugging Face dots1 folder (config.json + safetensors) into our model.

Loading never holds more than the model plus one checkpoint tensor: the model is built on the
meta device, materialized empty, and each tensor is read with `safe_open` and copied in place
(an expert's matrices straight into their slice of the stacked tensor). Which tensor goes where
is the plan of `anneal.checkpoints.hf_layout`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from anneal.errors import AnnealError
from anneal.model.config import Dots1Config
from anneal.checkpoints.hf_layout import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, check_names, check_shape,
                                          expert_range_or_all, hf_weight_plan, write_slot)

# ---------------------------------------------------------------------------------------------
# Finding the tensors of a folder
# ---------------------------------------------------------------------------------------------
def _safetensors_files(folder: Path) -> dict[Path, list[str] | None]:
    """Shard path -> tensor names the index assigns to it (None when there is no index)."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AnnealError(f"{index}: not a valid safetensors index ({e!r}); it needs a 'weight_map' "
                              "of tensor name -> shard file. Re-download the checkpoint.") from None
        by_file: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            by_file.setdefault(folder / shard, []).append(name)
        for shard in by_file:
            if not shard.is_file():
                raise AnnealError(f"{index}: points to shard '{shard.name}', which is not in {folder}. "
                                  "The download is incomplete; download the checkpoint again "
                                  "(huggingface-cli download <repo> resumes missing files).")
        return dict(by_file)
    single = folder / SAFE_WEIGHTS_NAME
    if single.is_file():
        return {single: None}
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = (f" Found {others[:3]} but no {SAFE_WEIGHTS_INDEX_NAME} saying which tensor is where."
            if others else "")
    bins = sorted(p.name for p in folder.glob("*.bin"))
    if bins:
        hint += (f" Found {bins[:3]}: PyTorch .bin checkpoints are not read; convert them with "
                 "transformers (`from_pretrained(...).save_pretrained(dst)`).")
    raise AnnealError(f"{folder}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}.{hint} "
                      "A checkpoint folder needs config.json and safetensors weights.")


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "F32", ...


def scan_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Tensor name -> (file, shape, dtype), from the safetensors headers only (no tensor data read).
    Raises AnnealError for a shard the index names but the folder lacks, or a corrupt header."""
    from safetensors import safe_open

    found: dict[str, TensorInfo] = {}
    for path, names in _safetensors_files(folder).items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for k in keys:
                    if k in found:
                        raise AnnealError(f"{path}: tensor '{k}' is also in {found[k].file.name}; "
                                          "a checkpoint must hold each tensor once.")
                    sl = f.get_slice(k)
                    found[k] = TensorInfo(path, tuple(sl.get_shape()), sl.get_dtype())
        except AnnealError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise AnnealError(f"{path}: cannot read safetensors header ({e}). The file is corrupt or "
                              "truncated; download it again.") from None
        if names is not None:
            absent = [n for n in names if n not in keys]
            if absent:
                raise AnnealError(f"{folder / SAFE_WEIGHTS_INDEX_NAME}: says tensor '{absent[0]}' is in "
                                  f"{path.name}, but that file does not hold it. Re-download the checkpoint.")
    return found


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def _materialize(cfg: Dots1Config, *, dtype: torch.dtype, device: str | torch.device, experts_backend: str,
                 expert_range: tuple[int, int]):
    from anneal.model.dots1 import Dots1ForCausalLM

    with torch.device("meta"):
        model = Dots1ForCausalLM(cfg, experts_backend=experts_backend, expert_range=expert_range)
    model.to(dtype)  # router buffers stay fp32 (moe.router.Router._apply)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty replaces parameters one by one, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    for router in model.routers().values():
        router.expert_load.zero_()  # non-persistent: not in the checkpoint
    return model


REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code")


def note_remote_code_keys(config_file: Path) -> list[str]:
    """config.json keys that point transformers at code shipped with the checkpoint: never run here
    (our own dots1 model is built) and not carried into exports; said once, not dropped silently."""
    try:
        keys = [k for k in REMOTE_CODE_KEYS if k in json.loads(Path(config_file).read_text())]
    except (OSError, ValueError):
        return []
    if keys:
        logging.getLogger("anneal").warning(
            f"{config_file}: {', '.join(keys)} ignored: anneal builds its own dots1 model and never runs code from "
            "a checkpoint; exports load with transformers' built-in dots1 (no trust_remote_code)")
    return keys


def load_hf_checkpoint(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                       experts_backend: str = "torch", device: str | torch.device = "cpu",
                       expert_range: tuple[int, int] | None = None):
    """Load an HF dots1 folder (config.json + model.safetensors or an index and shards) into
    `anneal.model.dots1.Dots1ForCausalLM`. Returns `(model, cfg)`; the model is in eval mode.

    Reads lazily with `safe_open`: peak memory is the model plus one checkpoint tensor.
    `dtype` is the model dtype (`e_score_correction_bias` stays fp32). `expert_range=(start,
    stop)` reads only those routed experts: the stacked expert tensors then have `stop - start`
    rows and `model.expert_range` is the range. Such a partial model runs only under
    expert parallelism: `moe.ep.shard_experts` (which `anneal.parallel.ds_engine.DeepSpeedEngine` calls)
    installs the dispatch that sends each token to the rank holding its expert; the trainer
    loads each rank's range this way (`anneal.parallel.layout.ParallelLayout.expert_range`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnealError(f"{folder}: checkpoint folder does not exist (or is not a folder). Pass a folder "
                          "holding config.json and *.safetensors, or a catalog name.")
    cfg = Dots1Config.from_json(folder / "config.json")
    note_remote_code_keys(folder / "config.json")
    rng = expert_range_or_all(cfg, expert_range)
    plan = hf_weight_plan(cfg, rng)
    tensors = scan_tensors(folder)
    check_names({n: i.shape for n, i in tensors.items()}, plan, cfg, rng, str(folder))
    for name, slot in plan.items():
        check_shape(name, tensors[name].shape, slot, str(tensors[name].file))

    model = _materialize(cfg, dtype=dtype, device=device, experts_backend=experts_backend, expert_range=rng)
    params = model.state_dict(keep_vars=True)
    missing_targets = {s.target for s in plan.values()} - set(params)
    if missing_targets:  # the plan and the model disagree: a bug, not bad input
        raise RuntimeError(f"hf_layout plan names {sorted(missing_targets)[:3]} that the model does not have")

    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(tensors[name].file, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                slot = plan[name]
                write_slot(params[slot.target], slot, f.get_tensor(name), cfg.moe_intermediate_size)
    model.eval()
    return model, cfg


