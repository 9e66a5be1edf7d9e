"""How one step folder is written and read: sharded (torch.distributed.checkpoint), reshardable,
atomic. `anneal.checkpoints.run_checkpoints` decides when and for which run; names come from
`anneal.checkpoints.discovery`.

Layout: <run>/ckpt/step_00000042/{__<rank>_0.distcp (each rank's own pieces), .metadata (DCP's
index of the pieces), trainer_state.json + .safetensors (step, tokens, data cursor, RNG, history,
callbacks, the AdamW step count), config.json, meta.json, checkpoint.json (the marker, written
last)} and <run>/ckpt/latest (the newest complete step folder's name).

Every parameter is stored as its fp32 master flattened to 1-D, with AdamW's exp_avg and
exp_avg_sq alongside (`model/<name>`, `exp_avg/<name>`, `exp_avg_sq/<name>`); each rank writes
the ranges it owns (its ZeRO fragment of each parameter, inside its experts' range for expert
parameters; the whole tensor in one process). Nothing is gathered. Loading asks for the ranges the
new layout owns and DCP reads them from whichever saved pieces overlap (`anneal.checkpoints.dcp_io`):
a run resumes under another EP size, DP world or ZeRO stage, or in one process.

A checkpoint is written into a temporary folder and renamed into place once the marker is in it,
and `latest` is replaced atomically after that, so a kill, a full disk or any error on any rank at
any moment leaves the previous checkpoint intact and never a half one. Nothing is unpickled on
load (`anneal.checkpoints.state_io` for the JSON state, `dcp_io` for DCP's metadata). A folder in
any other format is refused by `read_marker` (`discovery.format_problem`), naming the folder.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from anneal.checkpoints import atomic, dcp_io, discovery, state_io, write_guards
from anneal.checkpoints.discovery import FORMAT, LATEST, MARKER, STATE, STEP_META
from anneal.checkpoints.state_io import UnsafeStateError
from anneal.errors import AnnealError


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


# ------------------------------------------------------------------------------ sharded format
MODEL, EXP_AVG, EXP_AVG_SQ = "model/", "exp_avg/", "exp_avg_sq/"   # DCP key prefixes
_EXPERT_SUFFIXES = ("mlp.experts.w_gate_up", "mlp.experts.w_down")


@dataclass
class Piece:
    """What this rank owns of one tensor of the model: `value` (1-D: an fp32 master or a buffer)
    is the range [offset, offset + value.numel()) of the full tensor (shape `shape`) flattened;
    `exp_avg`/`exp_avg_sq` are AdamW's moments for the same range (None for a buffer). A rank
    that owns nothing of a tensor still lists it (an empty `value`), so every rank knows every
    full shape."""
    name: str
    shape: tuple
    offset: int
    value: torch.Tensor
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None

    @property
    def full_numel(self) -> int:
        return math.prod(self.shape)


def whole_pieces(tensors: dict[str, torch.Tensor]) -> list[Piece]:
    """One process holding whole tensors (no optimizer state)."""
    return [Piece(n, tuple(t.shape), 0, t.detach().reshape(-1)) for n, t in tensors.items()]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def agree_on_errors(fn) -> Exception | None:
    """Run `fn` on every rank and agree on failure: an error on any rank (a full disk on one node,
    a non-finite master in one rank's partition) is returned on all of them, with its type, instead
    of leaving the others waiting in a collective. One process: fn's own error."""
    outcome = ("", "")
    try:
        fn()
    except write_guards.DiskFullError as e:
        outcome = ("disk_full", str(e))
    except write_guards.NonFiniteWeightsError as e:
        outcome = ("nonfinite", str(e))
    except state_io.UnsafeStateError as e:
        outcome = ("unsafe", str(e))
    except (AnnealError, OSError) as e:
        outcome = ("error", f"rank {dist.get_rank()}: {e}" if _distributed() else str(e))
    outcomes = [outcome]
    if _distributed():
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome)  # plain (str, str) pairs
    kinds = {"disk_full": write_guards.DiskFullError, "nonfinite": write_guards.NonFiniteWeightsError,
             "unsafe": state_io.UnsafeStateError, "error": AnnealError}
    for kind, message in outcomes:
        if kind:
            return kinds[kind](message)
    return None


def _dcp_entries(pieces: list[Piece], moments: bool) -> tuple[dict, dict, dict]:
    """DCP's tensors, their (offset, global numel), and where stacked expert tensors are cut into
    items (one expert each: the streamed export reads an expert without the rest of its layer)."""
    tensors, chunks, splits = {}, {}, {}
    for p in pieces:
        if p.value.numel() == 0:
            continue
        pairs = [(MODEL, p.value)]
        if moments and p.exp_avg is not None:
            pairs += [(EXP_AVG, p.exp_avg), (EXP_AVG_SQ, p.exp_avg_sq)]
        for prefix, t in pairs:
            tensors[prefix + p.name] = t
            chunks[prefix + p.name] = (p.offset, p.full_numel)
            if p.name.endswith(_EXPERT_SUFFIXES) and p.shape:
                splits[prefix + p.name] = p.full_numel // p.shape[0]
    return tensors, chunks, splits


def save_checkpoint(ckpt_root: Path, step: int, model, hf_config: dict, trainer_state: dict, meta: dict,
                    keep: int = 2, layout: dict | None = None) -> Path:
    """Write step `step` and point `latest` at it. `model` is a module (one process, whole
    tensors, no optimizer state) or this rank's `Piece`s (an engine: fp32 masters, AdamW moments).

    Under a process group this is collective: every rank writes only its own pieces into its own
    file through DCP (nothing is gathered), rank 0 writes the JSON trainer state, config, meta and,
    last, the marker; then it renames the temporary folder into place and updates `latest`.
    Refuses non-finite weights (a diverged run must never replace a good checkpoint) and a disk
    without room; on any error on any rank the temporary folder is removed and the previous
    checkpoints are left as they were."""
    ckpt_root = Path(ckpt_root)
    pieces = model if isinstance(model, list) else whole_pieces(model.state_dict())
    rank = dist.get_rank() if _distributed() else 0
    name = discovery.step_dir_name(step)
    final = ckpt_root / name
    tensors, chunks, splits = _dcp_entries(pieces, moments=True)
    need = state_io.state_bytes(tensors) + (state_io.state_bytes(trainer_state) if rank == 0 else 0)
    what = f"checkpoint of step {step}"

    def check():
        ckpt_root.mkdir(parents=True, exist_ok=True)
        bad = write_guards.first_nonfinite({k: v for k, v in tensors.items() if k.startswith(MODEL)})
        if bad is not None:
            raise write_guards.NonFiniteWeightsError(
                f"{what}: weight {bad[len(MODEL):]} is not finite; not writing it (the previous checkpoints in "
                f"{ckpt_root} are kept)")
        write_guards.ensure_free_space(ckpt_root, need, what)

    error = agree_on_errors(check)
    if error is not None:
        raise error
    tmp_name = [f".tmp-{name}-{uuid.uuid4().hex[:8]}"]
    if _distributed():
        dist.broadcast_object_list(tmp_name, src=0)   # a plain str
    tmp = ckpt_root / tmp_name[0]

    def write():
        tmp.mkdir(exist_ok=True)
        with write_guards.reporting_full_disk(what, ckpt_root, need):
            dcp_io.save(tmp, tensors, chunks, splits)

    def commit():
        if rank != 0:
            return
        with write_guards.reporting_full_disk(what, ckpt_root, need):
            state_io.save_state(trainer_state, tmp / STATE)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
            (tmp / STEP_META).write_text(json.dumps(meta, indent=2))
            marker = {"format": FORMAT, "step": step, "layout": layout or {"world_size": 1},
                      "optimizer": any(p.exp_avg is not None for p in pieces),
                      "tensors": {p.name: list(p.shape) for p in pieces}}
            atomic.atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1))  # the folder's commit point
            atomic.fsync_tree(tmp)  # every rank's files and the marker on the disk before the rename
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic.fsync_path(ckpt_root)
            atomic.atomic_write_text(ckpt_root / LATEST, name)
        discovery.prune(ckpt_root, keep, just_written=final)

    error = agree_on_errors(write) or agree_on_errors(commit)
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint by step number, whatever `latest` says (`discovery`)."""
    return discovery.newest_checkpoint(ckpt_root)[0]


def read_marker(path: Path) -> dict:
    """The marker of a committed step folder in this version's format; anything else (torn, foreign,
    another format) is refused here, with one error naming the folder."""
    problem = discovery.format_problem(path)
    if problem == discovery.NOT_JSON:
        raise UnsafeStateError(f"{Path(path) / MARKER} is not JSON; refusing to read it")
    if problem is not None:
        raise AnnealError(f"{path}: {problem}: not a training checkpoint this version reads; resume or export "
                          "from another step")
    return json.loads((Path(path) / MARKER).read_text())


def expert_chunk(name: str, shape: tuple, expert_range: tuple[int, int] | None) -> tuple[int, int]:
    """(offset, numel) in the flattened full tensor `name` of what a model holding the experts
    `expert_range` needs: its experts' rows of a stacked expert tensor, else the whole tensor."""
    total = math.prod(shape)
    if expert_range is not None and name.endswith(_EXPERT_SUFFIXES):
        per = total // shape[0]
        start, stop = expert_range
        return start * per, (stop - start) * per
    return 0, total


def load_checkpoint(path: Path, model: torch.nn.Module, check_state=None) -> dict:
    """Load weights into `model` and return the trainer state (read first: a foreign pickle is
    refused before anything else; `check_state(state)` may refuse it before any weight is read). A model that holds only its rank's experts
    (`model.expert_range`, expert parallelism) reads only its experts' range. Collective under a
    process group (every rank loads its model)."""
    path = Path(path)
    state = state_io.load_state(path / STATE)
    if check_state is not None:
        check_state(state)
    marker = read_marker(path)
    saved = {k: tuple(v) for k, v in marker["tensors"].items()}
    sd = model.state_dict()
    missing = sorted(set(sd) - set(saved))
    if missing:
        raise AnnealError(f"{path}: the checkpoint lacks {missing[:3]}: it was written for another model")
    tensors, chunks = {}, {}
    for name, t in sd.items():
        offset, numel = expert_chunk(name, saved[name], getattr(model, "expert_range", None))
        if t.numel() != numel:
            raise AnnealError(f"{path}: {name} has shape {list(saved[name])} in the checkpoint, the model needs "
                              f"{list(t.shape)} (of its experts): another model configuration")
        target = t.view(-1) if t.is_contiguous() else torch.empty(numel, dtype=t.dtype)
        tensors[MODEL + name], chunks[MODEL + name] = target, (offset, math.prod(saved[name]))
    dcp_io.load(path, tensors, chunks, collective=_distributed())
    check_finite(path, tensors)
    with torch.no_grad():
        for name, t in sd.items():
            if not t.is_contiguous():
                t.copy_(tensors[MODEL + name].view(t.shape))
    return state


def load_pieces(path: Path, pieces: list[Piece], moments: bool = True) -> None:
    """Fill the masters (and AdamW moments) of an engine's pieces from a checkpoint, whatever
    layout wrote it: DCP reads the parts of the saved chunks that overlap each piece. Collective
    under a process group."""
    path = Path(path)
    marker = read_marker(path)
    if moments and not marker.get("optimizer"):
        raise AnnealError(f"{path}: the checkpoint holds no optimizer state (written from a model, not by a "
                          "training run); start a new run from its weights instead")
    params = [p for p in pieces if p.exp_avg is not None]
    tensors, chunks, _ = _dcp_entries(params, moments=moments)
    dcp_io.load(path, tensors, chunks, collective=_distributed())
    check_finite(path, tensors)


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint never holds NaN/inf (writing refuses them): one that does was damaged on the
    disk, and training from it would blame the LR. Names the first bad tensor."""
    bad = write_guards.first_nonfinite(tensors)
    if bad is not None:
        raise write_guards.CorruptCheckpointError(
            f"{path}: tensor {bad} holds NaN or inf values, which a checkpoint never holds (they are refused "
            "when written): the files were damaged on the disk. Move this step folder aside and resume (the "
            "newest other complete checkpoint is used), or copy the folder again")


def read_full_tensor(path: Path, name: str, shape: tuple | None = None, rows: tuple[int, int] | None = None
                     ) -> torch.Tensor:
    """One tensor of a checkpoint (whole, or the rows [start, stop) of its first dimension), read in
    this process alone: what the exporter streams, one tensor (or one expert) at a time."""
    shape = tuple(shape if shape is not None else read_marker(path)["tensors"][name])
    total = math.prod(shape)
    per = total // shape[0] if shape else total
    start, stop = rows if rows is not None else (0, shape[0] if shape else 1)
    md = dcp_io.read_metadata(Path(path) / dcp_io.METADATA).state_dict_metadata[MODEL + name]
    out = torch.empty((stop - start) * per, dtype=md.properties.dtype)
    dcp_io.load(path, {MODEL + name: out}, {MODEL + name: (start * per, total)}, collective=False)
    return out.view((stop - start, *shape[1:]) if shape else ())


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint, whole (one process; for small models and tests)."""
    return {n: read_full_tensor(path, n, tuple(s)) for n, s in read_marker(path)["tensors"].items()}
