"""Export our model as a Hugging Face dots1 folder.

Export writes the per-expert layout (what the hub files, vLLM, SGLang and transformers 4.x/5.x
read), sharded, into a temporary folder that replaces the target only when complete. Which
tensor goes where is the plan of `anneal.checkpoints.hf_layout`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Mapping

import torch

from anneal.checkpoints.discovery import META_FILE
from anneal.checkpoints.write_guards import (NonFiniteWeightsError, ensure_free_space, first_nonfinite,
                                             reporting_full_disk)
from anneal.errors import AnnealError
from anneal.model.config import Dots1Config
from anneal.checkpoints.hf_layout import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, TOKENIZER_FILES, export_dtype,
                                          export_tensor, hf_producers, hf_weight_plan, is_ignorable)

# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_config_dict(cfg: Dots1Config, dtype: torch.dtype | None = torch.bfloat16,
                       extra: dict | None = None) -> dict:
    """config.json for an export: `cfg.to_hf_dict()` plus the keys both transformers 4.x
    (top-level `rope_theta`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`) read."""
    d = cfg.to_hf_dict()
    d["rope_theta"] = cfg.rope_theta
    d.setdefault("rope_scaling", None)
    d["rope_parameters"] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if dtype is not None:
        d["torch_dtype"] = d["dtype"] = _dtype_name(dtype)
    d.update(extra or {})
    return d


def _generation_config(cfg: Dots1Config) -> dict:
    d = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            d[key] = getattr(cfg, key)
    return d


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in `src` (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, vocab/merges, chat template, ...) into `dst`; returns their names.
    Raises AnnealError when `src` holds none of them."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise AnnealError(f"{src}: tokenizer folder does not exist")
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise AnnealError(f"{src}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES[:6])}, ...). "
                          "Pass the checkpoint folder the model was loaded from as tokenizer_dir.")
    dst.mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copy2(src / name, dst / name)
    config = dst / "tokenizer_config.json"
    try:
        portable = portable_tokenizer_config(json.loads(config.read_text())) if config.is_file() else None
    except ValueError:   # not JSON: copied as it is, for transformers to judge
        portable = None
    if portable is not None:
        config.write_text(json.dumps(portable, indent=2) + "\n")
    return copied


# transformers 5 saves a fast tokenizer as "TokenizersBackend", a class transformers 4.x does not
# have; "PreTrainedTokenizerFast" is the same tokenizer (tokenizer.json) in both (5.x aliases it).
_V5_ONLY_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
_LOAD_ARTIFACTS = ("is_local", "local_files_only")   # how the source was loaded, not the tokenizer


def portable_tokenizer_config(config: dict) -> dict:
    """A tokenizer_config.json that transformers 4.x (serving stacks pinned to it) and 5.x both load."""
    out = {k: v for k, v in config.items() if k not in _LOAD_ARTIFACTS}
    if out.get("tokenizer_class") in _V5_ONLY_CLASSES:
        out["tokenizer_class"] = _V5_ONLY_CLASSES[out["tokenizer_class"]]
    return out


def write_json(path: Path, d: dict) -> None:
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def split_into_shards(metas: dict[str, torch.Tensor], max_shard_size: int | str
                       ) -> tuple[dict[str, list[str]], bool]:
    """filename -> tensor names, and whether the export is sharded (needs an index)."""
    try:
        from huggingface_hub import split_torch_state_dict_into_shards
    except ImportError:  # very old huggingface_hub: one file
        return {SAFE_WEIGHTS_NAME: list(metas)}, False
    split = split_torch_state_dict_into_shards(metas, max_shard_size=max_shard_size,
                                               filename_pattern="model{suffix}.safetensors")
    return dict(split.filename_to_tensors), split.is_sharded


def _write_weights(state_dict, cfg: Dots1Config, folder: Path, dtype: torch.dtype | None,
                   max_shard_size: int | str) -> None:
    """The HF tensors of `state_dict` (our names; values may be lazy, `StreamedCheckpoint`), one
    shard at a time: at most one shard's tensors are held, and each is checked to be finite."""
    producers = hf_producers(state_dict, cfg)
    expected = set(hf_weight_plan(cfg))
    extra = sorted(n for n in set(producers) - expected if not is_ignorable(
        n, producers[n][0], cfg))
    absent = sorted(expected - set(producers))
    if extra or absent:
        raise AnnealError(f"export: the model's state dict does not match its config "
                          f"(extra: {extra[:3]}, missing: {absent[:3]})")
    metas = {n: torch.empty(shape, dtype=export_dtype(n, dt, dtype), device="meta")
             for n, (shape, dt, _) in producers.items()}
    shards, sharded = split_into_shards(metas, max_shard_size)
    write_shards(folder, shards, sharded, lambda n: export_tensor(n, producers[n][2](), dtype),
                 what=f"export to {folder.parent}")


def save_shard(path: Path, tensors: dict[str, torch.Tensor], what: str) -> int:
    """One safetensors shard, refused if a tensor is not finite; returns its bytes."""
    from safetensors.torch import save_file

    bad = first_nonfinite(tensors)
    if bad is not None:
        raise NonFiniteWeightsError(f"{what}: weight {bad} is not finite; refusing to write a broken "
                                    "model (resume from the last good checkpoint with a lower LR)")
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_shards(folder: Path, shards: dict[str, list[str]], sharded: bool, make_tensor, what: str = "export") -> None:
    """Write each shard's tensors (`make_tensor(name)`, one shard in memory at a time, each checked
    to be finite) and, when sharded, the index with the total size."""
    total = 0
    for filename, names in shards.items():
        total += save_shard(folder / filename, {n: make_tensor(n) for n in names}, what)
    if sharded:
        weight_map = {n: f for f, names in shards.items() for n in names}
        write_json(folder / SAFE_WEIGHTS_INDEX_NAME,
                   {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})



def check_export_target(folder: Path, overwrite: bool) -> None:
    """An export goes into a new or empty folder; `overwrite` replaces only an earlier export (a
    folder holding META_FILE), never another folder of the user's."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise AnnealError(f"{folder}: exists and is not a folder; choose another export path")
    if not any(folder.iterdir()):
        return
    if not overwrite:
        raise AnnealError(f"{folder}: already exists and is not empty; choose another path, or replace an earlier "
                          "export with --overwrite (anneal-export) / export.overwrite=true (anneal)")
    if not (folder / META_FILE).is_file():
        raise AnnealError(f"{folder}: not an earlier export (no {META_FILE}); --overwrite / export.overwrite "
                          "replaces only an export, never another folder: choose another export path")


def publish_export(tmp: Path, folder: Path, tokenizer_dir, extra_files: Mapping[str, str | bytes] | None) -> None:
    """Finish an export written into `tmp`: the tokenizer and extra files in, every file readable by
    others (some writers create 0600 files), then `tmp` takes the place of `folder` by rename (an
    existing `folder` is moved aside first and removed after)."""
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp)
    for name, content in (extra_files or {}).items():
        (tmp / name).write_bytes(content.encode() if isinstance(content, str) else bytes(content))
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def export_hf_checkpoint(model, folder: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                         dtype: torch.dtype | None = torch.bfloat16, max_shard_size: int | str = "2GB",
                         extra_config: dict | None = None, overwrite: bool = False,
                         extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """Write `model` (our Dots1ForCausalLM) as an HF folder that transformers, vLLM and SGLang
    load: config.json, generation_config.json, per-expert safetensors (sharded with
    model.safetensors.index.json when over `max_shard_size`), tokenizer files from
    `tokenizer_dir`. Floating weights are cast to `dtype` (None keeps them), except
    `e_score_correction_bias`, which stays fp32. `extra_files` (file name -> text or bytes, e.g.
    the anneal's metadata JSON) are written into the folder inside the same atomic step.

    Atomic: everything is written into a hidden temporary folder next to `folder`, which then
    replaces `folder` with one rename; on any error the temporary folder is removed and
    `folder` is untouched. Refuses a non-empty existing `folder` unless `overwrite=True`.
    Returns the folder's path.
    """
    folder = Path(folder).absolute()
    check_export_target(folder, overwrite)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise AnnealError(f"{tokenizer_dir}: tokenizer folder does not exist")
    for name in extra_files or {}:
        if Path(name).name != name or name in ("", ".", "..") or name.endswith(".safetensors") \
                or name in ("config.json", "generation_config.json", SAFE_WEIGHTS_INDEX_NAME):
            raise AnnealError(f"export: extra file name {name!r} must be a plain file name that is not "
                              "config.json, generation_config.json or a weights file")
    streamed = getattr(model, "streamed", False)   # StreamedCheckpoint: checked tensor by tensor while written
    weights = model.state_dict()
    bad = None if streamed else first_nonfinite(weights)
    if bad is not None:
        raise NonFiniteWeightsError(f"export to {folder}: weight {bad} is not finite; refusing to write a broken "
                                    "model (resume from the last good checkpoint with a lower LR)")
    itemsize = dtype.itemsize if dtype is not None else None
    need = sum(v.numel() * (itemsize if itemsize and v.is_floating_point() else v.element_size())
               for v in weights.values())
    folder.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(folder.parent, need, f"export to {folder}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)
        cfg: Dots1Config = model.config
        write_json(tmp / "config.json", export_config_dict(cfg, dtype, extra_config))
        write_json(tmp / "generation_config.json", _generation_config(cfg))
        with reporting_full_disk(f"export to {folder}", folder.parent, need):
            _write_weights(weights, model.config, tmp, dtype, max_shard_size)
        publish_export(tmp, folder, tokenizer_dir, extra_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder

