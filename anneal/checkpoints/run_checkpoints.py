"""One owner for a run's checkpoints: what the trainer asks to save, resume from and export.

`RunCheckpoints` is *how* (the Checkpoint callback decides *when*): it alone turns a step into a
step folder under `<run>/ckpt` (`discovery` names the files, `training_state` writes and reads one
folder: DCP pieces, trainer state, config.json, meta.json, the marker last, then `latest`, then
pruning that never removes the newest complete checkpoint or the one just written). The parts of
a run hand it their state under explicit keys, the way torchtitan's `CheckpointManager` and
OLMo-core's `Checkpointer` take `Stateful` parts:

    engine     `EngineState`: its pieces (fp32 masters, AdamW moments, buffers) and step count
    data       the data stream's cursor, one entry per data shard (gathered from every rank)
    rng        every RNG of this process (`training_state.rng_state`)
    callbacks  `{key: Stateful}`, stored under trainer_state.json's "callbacks" by that key

Resuming: `load(step_dir, model)` reads the trainer state (checked first) and the weights into the
model before the engine is built (the engine casts the model to its compute dtype); the parts
given to `attach` afterwards get their state from it. Exporting: `export_source(tokens, world)`
says whether the final export streams from the last checkpoint or is written from memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from anneal.checkpoints import discovery, training_state
from anneal.checkpoints.discovery import META_FILE, STEP_META
from anneal.errors import AnnealError


class Stateful(Protocol):
    def state_dict(self): ...

    def load_state_dict(self, state) -> None: ...


class EngineState(Protocol):
    """What an optimizer engine hands the checkpoints."""

    def checkpoint_pieces(self) -> list[training_state.Piece]: ...

    def optimizer_step(self) -> int: ...

    def checkpoint_layout(self) -> dict:
        """The parallel layout it runs under, recorded in the marker."""

    def restore_state(self, step_dir: Path, optimizer_step: int) -> None:
        """Its masters and AdamW state from `step_dir` (the weights are already loaded). Collective."""


class DataState(Stateful, Protocol):
    n_shards: int   # state_dict(): this rank's shards; load_state_dict(): every shard of the run


@dataclass
class Resumed:
    """A loaded checkpoint whose state the run's parts have not all taken yet."""
    step_dir: Path
    state: dict

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def tokens(self) -> int:
        return self.state["tokens"]

    @property
    def history(self) -> list:
        return self.state["history"]


def _alone(value) -> list:
    return [value]


class RunCheckpoints:
    """The checkpoints of one run under `root` (`<run>/ckpt`: `for_run`). `gather(value)` returns
    every rank's value (the layout's all_gather; one process: [value]). `last` is the newest
    checkpoint of this run, written or resumed from."""

    def __init__(self, root: Path, *, keep: int = 2, gather: Callable[[object], list] = _alone):
        self.root, self.keep, self.gather = Path(root), keep, gather
        self.engine: EngineState | None = None
        self.data: DataState | None = None
        self.callbacks: dict[str, Stateful] = {}
        self.last: Path | None = None
        self.pending: Resumed | None = None

    @classmethod
    def for_run(cls, run_dir: Path, **kwargs) -> RunCheckpoints:
        return cls(Path(run_dir) / discovery.CKPT_DIR, **kwargs)

    # -- the folders ------------------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.root / discovery.step_dir_name(step)

    @staticmethod
    def step_number(step_dir: Path) -> int | None:
        return discovery.step_number(step_dir)

    def newest(self) -> tuple[Path | None, str | None]:
        """The newest complete checkpoint, and a note when `latest` names another (`discovery`)."""
        return discovery.newest_checkpoint(self.root)

    def step_folders(self) -> list[Path]:
        return discovery.step_folders(self.root)

    def why_incomplete(self, step_dir: Path) -> str | None:
        return discovery.why_incomplete(step_dir)

    def remove_stale_temporaries(self) -> list[Path]:
        return discovery.remove_stale_temporaries(self.root)

    # -- the parts --------------------------------------------------------------------------------
    def attach(self, *, engine: EngineState, data: DataState, callbacks: dict[str, Stateful]) -> None:
        """The parts whose state a checkpoint holds; after `load` they take the loaded state here."""
        self.engine, self.data, self.callbacks = engine, data, dict(callbacks)
        if self.pending is not None:
            self._restore(self.pending)
            self.pending = None

    # -- save -------------------------------------------------------------------------------------
    def save(self, step: int, tokens: int, *, history: list, hf_config: dict, meta: dict) -> Path:
        """Write step `step` of the attached parts (collective under a process group)."""
        data = [shard for rank_shards in self.gather(self.data.state_dict()) for shard in rank_shards]
        callbacks = {key: sd for key, cb in self.callbacks.items() if (sd := cb.state_dict()) is not None}
        state = {"step": step, "tokens": tokens, "data": data, "rng": training_state.rng_state(),
                 "history": list(history), "callbacks": callbacks, "optimizer_step": self.engine.optimizer_step()}
        self.last = training_state.save_checkpoint(self.root, step, self.engine.checkpoint_pieces(), hf_config,
                                                   state, meta, keep=self.keep,
                                                   layout=self.engine.checkpoint_layout())
        return self.last

    # -- resume -----------------------------------------------------------------------------------
    def load(self, step_dir: Path, model: torch.nn.Module, check_state: Callable[[dict], None] | None = None
             ) -> Resumed:
        """The trainer state of `step_dir` (refused by `check_state` before any weight is read) and its
        weights into `model`; the parts attached next take the rest. Collective."""
        step_dir = Path(step_dir)
        state = training_state.load_checkpoint(step_dir, model, check_state=check_state)
        self.last = step_dir
        self.pending = Resumed(step_dir, state)
        return self.pending

    def _restore(self, resumed: Resumed) -> None:
        state = resumed.state
        self.engine.restore_state(resumed.step_dir, int(state.get("optimizer_step", 0)))
        restore_data(self.data, state["data"])
        training_state.set_rng_state(state["rng"])
        for key, sd in state.get("callbacks", {}).items():
            if key in self.callbacks:
                self.callbacks[key].load_state_dict(sd)

    # -- export -----------------------------------------------------------------------------------
    def export_source(self, tokens: int, world: int) -> Path | None:
        """The checkpoint the final export streams from (several ranks, and the last checkpoint holds
        exactly `tokens`: nothing is gathered), or None: the model in memory is written."""
        if world == 1 or self.last is None:
            return None
        try:
            saved_tokens = meta_of_step(self.last).get("tokens")
        except AnnealError:   # an unreadable meta.json: write the model in memory instead
            return None
        return self.last if saved_tokens == tokens else None


def restore_data(stream: DataState, data: list[dict]) -> None:
    """The data cursor of every shard; a run resumes on any number of ranks that divides the saved
    number of data shards."""
    if len(data) != stream.n_shards:
        raise AnnealError(f"the checkpoint's data cursor has {len(data)} data shard(s) but this run reads "
                          f"{stream.n_shards}: resume with data.shards={len(data)} and a number of ranks "
                          "that divides it")
    stream.load_state_dict(data)


def anneal_meta(*, started_from: str | None, stage: str, lr: float, tokens_seen_total: int,
                step: int | None = None, tokens: int | None = None, schedule: list | None = None) -> dict:
    """The one schema of a checkpoint's meta.json and an export's anneal_meta.json: the base
    checkpoint the anneal `started_from` (what `anneal-soup` compares), where in the schedule it
    stopped (stage, lr, step, tokens of this run) and the tokens the weights have seen in total
    (base + this run). None-valued optional keys are left out."""
    meta = {"started_from": started_from, "stage": stage, "lr": lr, "tokens_seen_total": tokens_seen_total,
            "step": step, "tokens": tokens, "schedule": schedule}
    return {k: v for k, v in meta.items() if v is not None or k == "started_from"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise AnnealError(f"{path}: not readable as JSON ({e.__class__.__name__})") from None


def meta_of_step(step_dir: Path) -> dict:
    """A step folder's meta.json (the `anneal_meta` schema); {} when it has none."""
    return _read_json(Path(step_dir) / STEP_META)


def export_meta_files(meta: dict) -> dict[str, str]:
    """The extra files every export carries (`export_hf_checkpoint(extra_files=...)`): its meta."""
    return {META_FILE: json.dumps(meta, indent=2)}


def export_meta(folder: Path) -> dict:
    """An export's (or a soup's) anneal_meta.json; {} for a folder anneal did not write."""
    return _read_json(Path(folder) / META_FILE)
