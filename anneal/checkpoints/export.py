"""Turn a resumable training checkpoint into an HF folder (per-expert layout, bf16 by default)."""
from __future__ import annotations

from pathlib import Path

import torch

from anneal.checkpoints import dcp_io, discovery, training_state
from anneal.checkpoints.run_checkpoints import export_meta_files, meta_of_step
from anneal.errors import AnnealError
from anneal.model.config import Dots1Config


def find_step_folder(path: Path) -> Path:
    """Accept a step folder, a run's ckpt/ folder, or a run folder. Only the weights, config and
    meta JSON of the step are read (never its training state), so any step folder exports."""
    path = Path(path)
    if (path / discovery.MARKER).exists() and (path / "config.json").exists():
        return path
    for root in (path, path / discovery.CKPT_DIR):
        latest = training_state.latest_checkpoint(root)
        if latest is not None:
            return latest
    short = discovery.step_number(path)
    padded = path.with_name(discovery.step_dir_name(short)) if short is not None else None
    if padded is not None and padded != path and padded.is_dir():
        raise AnnealError(f"{path}: no such folder; step folders are named with 8 digits: {padded}")
    raise AnnealError(f"{path}: not a training checkpoint (no {discovery.MARKER} + config.json) and no "
                      "ckpt/latest inside. "
                      "Pass runs/<id>/ckpt/step_00000008 (a step folder) or runs/<id> (its newest checkpoint)")


class _LazyTensor:
    """One tensor of a DCP checkpoint, read when asked for: `t[e, ...]` reads expert e's rows only
    (the exporter's producers index stacked expert tensors expert by expert), `detach()` reads the
    whole tensor. Nothing is kept after it is handed out, except the last expert read (gate and up
    come from the same rows)."""

    def __init__(self, step_dir: Path, name: str, shape: tuple, dtype: torch.dtype):
        self.step_dir, self.name, self.shape, self.dtype = step_dir, name, torch.Size(shape), dtype
        self._cached: tuple[int, torch.Tensor] | None = None

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def detach(self) -> torch.Tensor:
        return training_state.read_full_tensor(self.step_dir, self.name, tuple(self.shape))

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        e = int(index[0])
        if self._cached is None or self._cached[0] != e:
            self._cached = (e, training_state.read_full_tensor(self.step_dir, self.name, tuple(self.shape),
                                                               rows=(e, e + 1))[0])
        rows = self._cached[1]
        return rows[index[1:]] if len(index) > 1 else rows


class StreamedCheckpoint:
    """What `export_hf_checkpoint` reads from a model (config, state_dict()), backed by a DCP step
    folder: each tensor is read when the exporter writes it, stacked experts one expert at a time,
    so one process converts a checkpoint far larger than its RAM (it holds one shard at a time)."""
    streamed = True

    def __init__(self, step_dir: Path):
        self.config = Dots1Config.from_json(step_dir / "config.json")
        md = dcp_io.read_metadata(step_dir / dcp_io.METADATA).state_dict_metadata
        marker = training_state.read_marker(step_dir)
        self._sd = {n: _LazyTensor(step_dir, n, tuple(shape), md[training_state.MODEL + n].properties.dtype)
                    for n, shape in marker["tensors"].items()}

    def state_dict(self) -> dict:
        return self._sd


def export_training_checkpoint(path: Path, out: Path, dtype: str = "bfloat16", max_shard_size: str = "2GB",
                               overwrite: bool = False) -> Path:
    """A training checkpoint (any layout) -> an HF folder, streamed tensor by tensor and expert by
    expert (`StreamedCheckpoint`)."""
    from anneal.checkpoints.hf_export import export_hf_checkpoint

    step_dir = find_step_folder(path)
    model = StreamedCheckpoint(step_dir)
    run_dir = step_dir.parent.parent
    tokenizer_dir = run_dir / "tokenizer"
    meta = meta_of_step(step_dir)
    export_hf_checkpoint(model, out, tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None,
                         dtype=getattr(torch, dtype), max_shard_size=max_shard_size, overwrite=overwrite,
                         extra_files=export_meta_files(meta))
    return out
