"""Checkpoint soups: the weighted mean of several HF exports of one base checkpoint.

OLMo 2 shipped its final models as soups of anneals that differ in data order; the average of
branches that left one stable checkpoint by a short, low-LR anneal stays in the same basin and
usually beats each branch. `make_soup` streams: for each tensor it reads it from one ingredient
at a time (a `safe_open` handle opened for that read and closed after, so no input file stays
mapped) into one fp32 accumulator, casts the mean back to the ingredients' dtype and adds it to
the output shard being built; a full shard is written and freed. Peak host memory is about
2 × `max_shard_size` (the shard and the bytes safetensors serializes it into) + one fp32 tensor +
two copies of one input tensor (the read and its mapped file pages), whatever the number of
inputs (measured: three 115 MB bf16 exports with a 33 MB largest tensor, +0.20 GB over the
process's 0.26 GB at 20MB shards, +0.30 GB at one 110 MB shard).

The router's `e_score_correction_bias` is averaged like every other tensor. It is a per-expert
additive term in expert *selection* (`sigmoid(x·g_e) + b_e`, top-k); the soup's gate weights are
the mean of the ingredients' gate weights, so its router logits are exactly the mean of theirs
(the logits are linear in the weights) and its scores approximately so (the ingredients are close:
same base, anneal LRs). The mean bias is then the bias that, added to approximately the mean
scores, reproduces approximately the mean selection scores: the same first-order argument as for
every other weight, and the biases of branches from one base differ by a few ±1e-3 update steps.
The alternative — recalibrating the bias on data after souping (forward passes with the bias
update on, weights frozen) — corrects what the approximation misses; it needs data and compute
and is not done here.

Bad input is one AnnealError naming the first offending file/field/tensor, raised before any
tensor is read: fewer than two ingredients, weights of the wrong count or not summing to a positive
number, an output folder that exists, a missing or corrupt shard, architectures that differ,
different base checkpoints (anneal_meta.json `started_from`; allowed with
`allow_different_bases`), tensor names, shapes or dtypes that differ, different tokenizers.
Everything is written into a hidden folder next to the target, renamed into place when complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from anneal.checkpoints.discovery import META_FILE
from anneal.checkpoints.hf_export import copy_tokenizer_files, split_into_shards, write_json, write_shards
from anneal.checkpoints.hf_layout import (TOKENIZER_FILES, check_names, check_shape,
                                          hf_weight_plan)
from anneal.checkpoints.hf_load import TensorInfo, scan_tensors
from anneal.errors import AnnealError
from anneal.model.config import Dots1Config

# safetensors dtype names of the floating tensors a soup averages
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class Ingredient:
    """One export: its architecture, its anneal_meta.json ({} when absent) and its tensors."""
    folder: Path
    arch: dict
    meta: dict
    tensors: dict[str, TensorInfo]


@dataclass
class SoupResult:
    folder: Path
    weights: list[float]             # normalized to sum 1
    tensors: int
    shards: int
    peak_host_gb: float | None       # peak resident memory of the process (`peak_memory_gb`; None: not asked)
    peak_host_before_gb: float | None  # the same before the first tensor was read


def read_ingredient(folder: str | os.PathLike) -> Ingredient:
    """Read config.json, anneal_meta.json and the safetensors headers of one export; check the
    tensors are the released dots1 layout its config implies."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnealError(f"{folder}: soup ingredient is not a folder; pass HF export folders "
                          "(e.g. runs/<name>/hf)")
    cfg = Dots1Config.from_json(folder / "config.json")
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise AnnealError(f"{meta_path}: not valid JSON ({e})") from None
    tensors = scan_tensors(folder)
    plan = hf_weight_plan(cfg)
    check_names({n: i.shape for n, i in tensors.items()}, plan, cfg, (0, cfg.n_routed_experts), str(folder))
    for name, slot in plan.items():
        check_shape(name, tensors[name].shape, slot, str(tensors[name].file))
    for name, info in tensors.items():
        if info.dtype not in _DTYPES:
            raise AnnealError(f"{info.file}: tensor '{name}' has dtype {info.dtype}; a soup averages "
                              f"floating tensors ({', '.join(_DTYPES)}). Soup the bf16/fp32 exports.")
    return Ingredient(folder, asdict(cfg), meta, tensors)


def normalized_weights(weights: list[float] | None, n: int) -> list[float]:
    """Uniform when None; else `weights` divided by their sum, which must be positive."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise AnnealError(f"--weights: {len(weights)} weight(s) for {n} ingredients; give one weight per "
                          "ingredient, in the same order")
    if not all(math.isfinite(w) for w in weights):
        raise AnnealError(f"--weights: {weights} holds a non-finite number")
    total = math.fsum(weights)
    if total <= 0:
        raise AnnealError(f"--weights: {weights} sum to {total:g}; they must sum to a positive number "
                          "(each ingredient gets weight / sum)")
    return [w / total for w in weights]


def check_compatible(ings: list[Ingredient], allow_different_bases: bool = False) -> None:
    """Raise on the first difference that makes a weight-by-weight mean meaningless."""
    ref = ings[0]
    for ing in ings[1:]:
        for key, value in ref.arch.items():
            if ing.arch[key] != value:
                raise AnnealError(f"{ing.folder / 'config.json'}: field '{key}' is {ing.arch[key]!r} but "
                                  f"{ref.folder / 'config.json'} has {value!r}; a soup averages exports of "
                                  "one architecture")
        base, other = ref.meta.get("started_from"), ing.meta.get("started_from")
        if base != other and not allow_different_bases:
            raise AnnealError(f"{ing.folder / META_FILE}: started_from is {other!r} but {ref.folder / META_FILE} "
                              f"has {base!r}; souping anneals of different base checkpoints rarely works "
                              "(their weights need not share a basin). Pass --allow-different-bases to do it anyway")
        absent = sorted(set(ref.tensors) - set(ing.tensors))
        if absent:
            raise AnnealError(f"{ing.folder}: has no tensor '{absent[0]}', which {ref.folder} has")
        extra = sorted(set(ing.tensors) - set(ref.tensors))
        if extra:
            raise AnnealError(f"{ing.folder}: has tensor '{extra[0]}', which {ref.folder} does not have")
        for name, info in ref.tensors.items():
            theirs = ing.tensors[name]
            if theirs.shape != info.shape or theirs.dtype != info.dtype:
                raise AnnealError(f"{theirs.file}: tensor '{name}' is {theirs.dtype} {list(theirs.shape)} but in "
                                  f"{info.file} it is {info.dtype} {list(info.shape)}")
        for name in TOKENIZER_FILES:
            a, b = ref.folder / name, ing.folder / name
            if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
                raise AnnealError(f"{b}: differs from {a}; the ingredients must share one tokenizer")


def soup_meta(ings: list[Ingredient], weights: list[float]) -> dict:
    """The soup's anneal_meta.json: its ingredients with their weights and metadata, plus every
    top-level key on which all ingredients agree (e.g. started_from, stage, lr), which stays true
    of the soup."""
    meta = {k: v for k, v in ings[0].meta.items() if all(i.meta.get(k, object()) == v for i in ings[1:])}
    meta["soup"] = {
        "method": "weighted mean, fp32 accumulation, cast to the ingredients' dtype",
        "ingredients": [{"path": str(i.folder.resolve()), "weight": w, "anneal_meta": i.meta}
                        for i, w in zip(ings, weights)],
    }
    return meta


@torch.no_grad()
def _mean_tensor(name: str, ings: list[Ingredient], weights: list[float]) -> torch.Tensor:
    from safetensors import safe_open

    info = ings[0].tensors[name]
    acc = torch.zeros(info.shape, dtype=torch.float32)
    for ing, w in zip(ings, weights):
        with safe_open(ing.tensors[name].file, framework="pt", device="cpu") as f:
            acc.add_(f.get_tensor(name), alpha=w)  # upcast element by element into fp32
    return acc.to(_DTYPES[info.dtype])


def make_soup(folders: list[str | os.PathLike], out: str | os.PathLike, weights: list[float] | None = None, *,
              allow_different_bases: bool = False, max_shard_size: int | str = "2GB",
              peak_memory_gb: Callable[[], float] | None = None) -> SoupResult:
    """Write the weighted mean of the HF exports `folders` as a new HF folder `out` (see the module
    docstring). `weights` default to uniform and are normalized to sum 1. `peak_memory_gb()`, when
    given, reports the process's peak host memory (before the first tensor is read and at the end)."""
    peak = peak_memory_gb or (lambda: None)
    out = Path(out).absolute()
    if len(folders) < 2:
        raise AnnealError(f"a soup needs two or more exports, got {len(folders)}")
    w = normalized_weights(weights, len(folders))
    if out.exists():
        raise AnnealError(f"{out}: already exists; a soup is written to a new folder")
    ings = [read_ingredient(f) for f in folders]
    check_compatible(ings, allow_different_bases)

    ref = ings[0]
    order = sorted(ref.tensors, key=lambda n: (str(ref.tensors[n].file), n))  # read the inputs file by file
    metas = {n: torch.empty(ref.tensors[n].shape, dtype=_DTYPES[ref.tensors[n].dtype], device="meta") for n in order}
    shards, sharded = split_into_shards(metas, max_shard_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    before = peak()
    try:
        write_shards(tmp, shards, sharded, lambda n: _mean_tensor(n, ings, w), what=f"soup {out}")
        for name in ("config.json", "generation_config.json"):
            if (ref.folder / name).is_file():
                shutil.copy2(ref.folder / name, tmp / name)
        if any((ref.folder / n).is_file() for n in TOKENIZER_FILES):
            copy_tokenizer_files(ref.folder, tmp)
        write_json(tmp / META_FILE, soup_meta(ings, w))
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SoupResult(out, w, len(order), len(shards), peak(), before)
