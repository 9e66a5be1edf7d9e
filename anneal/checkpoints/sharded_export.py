"""The HF export of a DCP training checkpoint written by every rank at once, nothing gathered.

Each rank reads from the checkpoint only the tensors it writes (`StreamedCheckpoint`: one tensor,
or one expert of a stacked expert tensor, at a time) and writes them straight into its own
safetensors shards:
- the per-expert tensors (the released names and layout, `anneal.checkpoints.hf_layout`) of the
  experts it owns under expert parallelism (EP group 0: ranks 0..ep_size-1; with EP 1 the experts
  are spread over all ranks in contiguous blocks);
- rank 0 also the non-expert tensors, then the index covering every rank's shards, config.json,
  generation_config.json, the tokenizer and the extra files (anneal_meta.json).
Shards are numbered globally (model-00003-of-00012.safetensors) after the ranks exchange their
shard counts. Everything goes into a temporary folder that rank 0 renames into place after every
rank has written (the folder appears whole or not at all); an error on any rank (non-finite
weight, full disk) is agreed on by all ranks and the temporary folder removed.
A rank holds at most one shard plus one expert (the last read) at a time.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from anneal.checkpoints import training_state
from anneal.checkpoints.export import StreamedCheckpoint, find_step_folder
from anneal.checkpoints.hf_export import (_generation_config, check_export_target, export_config_dict, publish_export, save_shard,
                                          split_into_shards, write_json)
from anneal.checkpoints.hf_layout import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, export_dtype, export_tensor,
                                          hf_producers, hf_weight_plan, is_ignorable)
from anneal.checkpoints.write_guards import ensure_free_space, reporting_full_disk
from anneal.errors import AnnealError

_EXPERT = re.compile(r".*\.mlp\.experts\.(\d+)\.")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def expert_writer(expert: int, n_experts: int, ep_size: int, world: int) -> int:
    """The rank that writes expert `expert`: its owner in EP group 0 under EP, else a contiguous
    block of experts per rank (the experts a rank would own with EP = world)."""
    writers = ep_size if ep_size > 1 else (world if n_experts % world == 0 else 1)
    return expert // (n_experts // writers)


def export_checkpoint(path: Path, folder: Path, *, tokenizer_dir: Path | None = None,
                      dtype: torch.dtype | None = torch.bfloat16, max_shard_size: int | str = "2GB",
                      overwrite: bool = False, extra_files: Mapping[str, str | bytes] | None = None,
                      ep_size: int = 1) -> Path:
    """Collective under a process group (one process otherwise): the HF folder of DCP checkpoint
    `path`. Returns the folder."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    step_dir = find_step_folder(Path(path))
    folder = Path(folder).absolute()
    src = StreamedCheckpoint(step_dir)
    cfg = src.config
    producers = hf_producers(src.state_dict(), cfg)
    expected = set(hf_weight_plan(cfg))
    extra = sorted(n for n in set(producers) - expected if not is_ignorable(n, producers[n][0], cfg))
    absent = sorted(expected - set(producers))
    if extra or absent:
        raise AnnealError(f"export: the checkpoint does not match its config (extra: {extra[:3]}, missing: {absent[:3]})")

    def writer(name: str) -> int:
        m = _EXPERT.match(name)
        return expert_writer(int(m.group(1)), cfg.n_routed_experts, ep_size, world) if m else 0

    mine = [n for n in producers if writer(n) == rank]
    metas = {n: torch.empty(producers[n][0], dtype=export_dtype(n, producers[n][1], dtype), device="meta")
             for n in mine}
    shards = list(split_into_shards(metas, max_shard_size)[0].values()) if metas else []
    need = sum(m.numel() * m.element_size() for m in metas.values())
    counts = _all_gather(len(shards))
    first, n_files = sum(counts[:rank]), sum(counts)

    def filename(i: int) -> str:
        return SAFE_WEIGHTS_NAME if n_files == 1 else f"model-{first + i + 1:05d}-of-{n_files:05d}.safetensors"

    tmp_name = [f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"]
    if _distributed():
        dist.broadcast_object_list(tmp_name, src=0)
    tmp = folder.parent / tmp_name[0]

    def check():
        if rank == 0:
            check_export_target(folder, overwrite)
            if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
                raise AnnealError(f"{tokenizer_dir}: tokenizer folder does not exist")
        folder.parent.mkdir(parents=True, exist_ok=True)
        ensure_free_space(folder.parent, need, f"export to {folder} (rank {rank}'s shards)")
        tmp.mkdir(exist_ok=True)

    weight_map: dict[str, str] = {}
    total = [0]

    def write():
        with reporting_full_disk(f"export to {folder}", folder.parent, need):
            for i, names in enumerate(shards):
                total[0] += save_shard(tmp / filename(i), {n: export_tensor(n, producers[n][2](), dtype) for n in names},
                                       f"export to {folder}")
                os.chmod(tmp / filename(i), 0o644)
                weight_map.update({n: filename(i) for n in names})

    maps: list = []

    def commit():
        if rank != 0:
            return
        with reporting_full_disk(f"export to {folder}", folder.parent, need):
            os.chmod(tmp, 0o755)
            if n_files > 1:
                merged = {n: f for m, _ in maps for n, f in m.items()}
                write_json(tmp / SAFE_WEIGHTS_INDEX_NAME, {"metadata": {"total_size": sum(t for _, t in maps)},
                                                           "weight_map": dict(sorted(merged.items()))})
            write_json(tmp / "config.json", export_config_dict(cfg, dtype, None))
            write_json(tmp / "generation_config.json", _generation_config(cfg))
            publish_export(tmp, folder, tokenizer_dir, extra_files)

    error = training_state.agree_on_errors(check) or training_state.agree_on_errors(write)
    if error is None:
        maps.extend(_all_gather((weight_map, total[0])))
        error = training_state.agree_on_errors(commit)
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error
    return folder


def _all_gather(obj) -> list:
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)   # plain ints, strs and dicts of them
    return out
