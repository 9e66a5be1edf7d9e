"""The run folder: one writer at a time, claimed once, never written over by accident, and resumed
from its newest complete checkpoint or not at all.

- A lock (`fcntl.flock` on `<run>/.lock`, which names the holder's PID and host) is held from the
  claim to the end of the process; the OS drops it when the process dies, so a crash leaves no
  stale lock. A second run of the same folder stops with one line naming the holder.
- A folder that holds training state (a step folder, a trained step in metrics.jsonl) is only
  continued (`run.resume=true`, from the newest complete checkpoint, `anneal.checkpoints.run_checkpoints`)
  or started over on request (`run.overwrite=true`); a folder whose run never trained a step (it
  failed at start-up) is taken over by the next run.
- `run.resume=true` of a folder that holds no run is an error.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from anneal.checkpoints import atomic
from anneal.checkpoints.run_checkpoints import RunCheckpoints
from anneal.errors import AnnealError
from anneal.train import resume

RUN_MARKER = "config.yaml"  # a folder holding this file holds a run
LOCK = ".lock"
RUN_FILES = ("ckpt", "tokenizer", "metrics.jsonl", "wandb", "wandb_id", "hf", RUN_MARKER, resume.RECORD_DIR)


class RunLock:
    """An exclusive lock on a run folder for the life of this process (or until release())."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"PID {h['pid']} on host {h['host']} (since {h['since']})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise AnnealError(f"run folder {self.path.parent} is in use by {who}: one run writes a folder at a "
                              "time. Wait for it to finish (or stop it), or choose another run.name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor drops the flock
            self._fd = None


@dataclass
class Claim:
    """What claiming a run folder decided (rank 0)."""
    resume_from: Path | None
    lock: RunLock | None = None
    notes: list[str] = field(default_factory=list)


def training_evidence(run_dir: Path) -> str | None:
    """What shows that a run folder's run trained (a phrase), None if it never trained a step."""
    steps = RunCheckpoints.for_run(run_dir).step_folders()
    if steps:
        return f"step folders {', '.join(p.name for p in steps[-3:])}"
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        trained = [line for line in metrics.read_text(errors="replace").splitlines() if '"loss"' in line]
        if trained:
            return f"{len(trained)} trained steps in metrics.jsonl"
    return None


def _wipe(run_dir: Path) -> None:
    for name in RUN_FILES:
        p = run_dir / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> Claim:
    """Lock the folder, decide where the run starts (see the module docstring), remove what killed
    writers left, and write config.yaml (with the `resumes:` history) and the overrides record."""
    run_dir = Path(run_dir)
    marker = run_dir / RUN_MARKER
    if cfg.run.resume and not marker.is_file():
        raise AnnealError(f"run.resume=true: {run_dir} holds no run to continue (no {RUN_MARKER}); check run.root "
                          "and run.name, or start a new run without run.resume=true")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()
    except OSError as e:  # read-only, not a folder, no space
        raise AnnealError(f"cannot write the run folder {run_dir} ({e.strerror}): choose a writable run.root") from None
    try:
        claim = _claim_locked(cfg, run_dir, marker)
    except BaseException:
        lock.release()
        raise
    claim.lock = lock
    return claim


def _claim_locked(cfg: DictConfig, run_dir: Path, marker: Path) -> Claim:
    notes: list[str] = []
    evidence = training_evidence(run_dir) if marker.is_file() else None
    resume_from = None
    if marker.is_file() and not cfg.run.resume:
        if evidence and not cfg.run.overwrite:
            raise AnnealError(f"run folder {run_dir} already holds a run ({evidence}). Pass run.resume=true to "
                              "continue it, run.overwrite=true to start it over, or another run.name")
        if not evidence:
            notes.append(f"{run_dir} holds a run that never trained a step: taking the folder over")
        _wipe(run_dir)
    elif cfg.run.resume:
        checkpoints = RunCheckpoints.for_run(run_dir)
        resume_from, note = checkpoints.newest()
        if note:
            notes.append(note)
        if resume_from is None and evidence:
            reasons = [f"{p.name}: {checkpoints.why_incomplete(p)}" for p in checkpoints.step_folders()]
            raise AnnealError(f"run.resume=true: {run_dir} holds training state ({evidence}) but no complete "
                              f"checkpoint{' (' + '; '.join(reasons[-3:]) + ')' if reasons else ''}; nothing was "
                              "changed. Restore a step folder, or start the run over with run.overwrite=true")
        if resume_from is None:
            notes.append(f"{run_dir} holds a run that never trained a step: starting it from step 0")
            _wipe(run_dir)
    notes += remove_stale_partials(cfg, run_dir)
    if resume_from is None:
        marker.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        resume.write_record(run_dir, resume.command_line_overrides(), cfg)
    else:
        notes += _record_changes(cfg, run_dir, resume_from)
    return Claim(resume_from, notes=notes)


def _record_changes(cfg: DictConfig, run_dir: Path, resume_from: Path) -> list[str]:
    """Compare the resumed run's config with its config.yaml: refuse a change of what cannot
    change, list the rest in one line, and record them in config.yaml's `resumes:` history."""
    marker = run_dir / RUN_MARKER
    saved = OmegaConf.to_container(OmegaConf.load(marker), resolve=False) or {}
    history = list(saved.pop("resumes", None) or [])
    current = OmegaConf.to_container(cfg, resolve=True)
    changes = resume.config_changes(saved, current)
    resume.check_changes(changes, marker)
    if not changes:
        return []
    step = RunCheckpoints.step_number(resume_from)
    history.append(resume.resumes_entry(step, changes))
    atomic.atomic_write_text(marker, OmegaConf.to_yaml({**current, "resumes": history}))
    record = run_dir / resume.RECORD_DIR / resume.OVERRIDES
    saved_overrides = resume.load_overrides(record) if record.is_file() else []
    resume.write_record(run_dir, resume.merge_overrides(saved_overrides, resume.command_line_overrides()), cfg)
    return [f"settings changed on resume (from step {step + 1}; recorded in {marker.name} under resumes:): "
            + resume.format_changes(changes)]


def remove_stale_partials(cfg: DictConfig, run_dir: Path) -> list[str]:
    """Temporary checkpoint folders and partial exports that killed writers of this run left."""
    stale = RunCheckpoints.for_run(run_dir).remove_stale_temporaries()
    export_dir = Path(cfg.export.dir) if cfg.export.get("dir") else run_dir / "hf"
    if export_dir.parent.is_dir():
        for p in export_dir.parent.glob(f".{export_dir.name}.partial-*"):
            shutil.rmtree(p, ignore_errors=True)
            stale.append(p)
    return [f"removed what an interrupted writer left: {', '.join(str(p) for p in stale)}"] if stale else []


_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_./:@+-]+")


def hydra_value(value: str) -> str:
    """A value as Hydra's override grammar reads it back: quoted unless plainly safe."""
    if _HYDRA_PLAIN.fullmatch(value) and not value[0] in "+-":
        return value
    # Hydra reads a backslash as an escape only before a quote or the closing quote
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"   # ${...}: not an interpolation


def resume_command(cfg: DictConfig, run_dir: Path, *extra: str) -> str:
    """One shell line that continues this run: the run folder spelled out (absolute), run.resume=true
    and `extra` (the run's own overrides are replayed from its record, `anneal.train.resume`)."""
    run_dir = Path(run_dir).absolute()
    args = [f"run.root={hydra_value(str(run_dir.parent))}", f"run.name={hydra_value(run_dir.name)}",
            "run.resume=true", *extra]
    return " ".join(["anneal", *map(shlex.quote, args)])


def wandb_group(cfg: DictConfig, run_dir: Path) -> str | None:
    """logging.group, or under `anneal --multirun` the sweep's folder name: every branch of a sweep
    lands in one W&B group, so its per-source eval curves sit side by side."""
    if cfg.logging.group:
        return cfg.logging.group
    from hydra.types import RunMode

    hydra = _hydra_job()
    return Path(run_dir).parent.name if hydra is not None and hydra.mode == RunMode.MULTIRUN else None


def _hydra_job():
    """Hydra's config of the running `anneal` job; None when train() is called without Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None
