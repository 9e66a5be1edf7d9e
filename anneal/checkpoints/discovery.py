"""The on-disk layout of a run's `ckpt/` folder (the one place that names its files and folders)
and which step folders are usable checkpoints, which one a resume continues from, which ones
pruning may delete. `anneal.checkpoints.run_checkpoints` is what the rest of the project asks.

`ckpt/latest` is a hint, not the truth: a host crash can leave it missing, empty or naming a
folder that never got its marker. A resume takes the newest *complete* step folder by step
number (marker present and naming that step, every file DCP's index lists present and long
enough, the trainer state readable), and says so when that differs from `latest`.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open

from anneal.checkpoints import dcp_io
from anneal.errors import AnnealError

CKPT_DIR = "ckpt"              # <run>/ckpt holds the step folders and `latest`
FORMAT = "anneal-dcp/1"         # the marker's format: the only one this version reads or writes
LATEST = "latest"
MARKER = "checkpoint.json"     # written last: a step folder without it is not a checkpoint
STATE = "trainer_state"        # <step>/trainer_state.json + .safetensors (anneal.checkpoints.state_io)
STEP_META = "meta.json"        # <step>/meta.json: where in the schedule the step is (`anneal_meta`)
# every export's (and soup's) copy of that schema: what marks a folder as an anneal export, and
# where `anneal checkpoint=<folder>` finds the LR to start from when schedule.start_lr is null
META_FILE = "anneal_meta.json"
_STEP_DIR = re.compile(r"step_(\d+)")
NOT_JSON = f"{MARKER} is not JSON"   # a marker that is not ours: refused as unsafe


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------- discovery
def step_number(folder: Path) -> int | None:
    m = _STEP_DIR.fullmatch(Path(folder).name)
    return int(m.group(1)) if m else None


def step_folders(ckpt_root: Path) -> list[Path]:
    """Every step_N folder (complete or not), by step number."""
    root = Path(ckpt_root)
    found = [p for p in root.glob("step_*") if p.is_dir() and step_number(p) is not None] if root.is_dir() else []
    return sorted(found, key=step_number)


def format_problem(step_dir: Path) -> str | None:
    """Why `step_dir` is not a committed step folder in the format this version writes (a short
    phrase; `NOT_JSON` for a marker that is not ours), None when it is: the one place a torn,
    foreign or unknown format is refused (`training_state.read_marker` raises it)."""
    problem = _commit_problem(step_dir)
    if problem is not None:
        return problem
    found = json.loads((Path(step_dir) / MARKER).read_text()).get("format")
    return None if found == FORMAT else f"checkpoint format {found!r}, this version reads {FORMAT!r}"


def _commit_problem(step_dir: Path) -> str | None:
    """Why `step_dir` was never committed: no marker, or one that does not name its step. A
    committed folder in another format counts as complete, so that reading it refuses it loudly
    (`format_problem`) instead of a resume silently taking an older step."""
    step_dir = Path(step_dir)
    if not (step_dir / MARKER).exists():
        return f"no {MARKER}"
    try:
        marker = json.loads((step_dir / MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return NOT_JSON
    if not isinstance(marker, dict) or (step_number(step_dir) is not None
                                        and marker.get("step") != step_number(step_dir)):
        return f"{MARKER} names another step"
    return None


def why_incomplete(step_dir: Path) -> str | None:
    """None for a complete checkpoint, else what is wrong with it (a short phrase)."""
    step_dir = Path(step_dir)
    problem = _commit_problem(step_dir)
    if problem is not None:
        return problem
    if not (step_dir / f"{STATE}.json").exists() and (step_dir / f"{STATE}.pt").exists():
        return f"{STATE}.pt is a pickle, which anneal does not unpickle (it can run code)"
    try:
        json.loads((step_dir / f"{STATE}.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return f"{STATE}.json is missing or not JSON"
    st = step_dir / f"{STATE}.safetensors"
    if st.exists():
        try:
            with safe_open(str(st), "pt") as f:
                f.keys()
        except (SafetensorError, OSError, RuntimeError):
            return f"{st.name} is truncated or not safetensors"
    try:
        md = dcp_io.read_metadata(step_dir / dcp_io.METADATA)
    except AnnealError:
        return f"{dcp_io.METADATA} is missing or unreadable"
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = step_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size < size:
            return f"{name} is truncated ({f.stat().st_size} of {size} bytes)"
    return None


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """The complete step folders, by step number."""
    return [p for p in step_folders(ckpt_root) if why_incomplete(p) is None]


def latest_pointer(ckpt_root: Path) -> str:
    """What `latest` says ('' when it is missing or empty)."""
    try:
        return (Path(ckpt_root) / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def newest_checkpoint(ckpt_root: Path) -> tuple[Path | None, str | None]:
    """(the newest complete checkpoint, a note when it is not the one `latest` names)."""
    ckpt_root = Path(ckpt_root)
    complete = complete_checkpoints(ckpt_root)
    newest = complete[-1] if complete else None
    pointer = latest_pointer(ckpt_root)
    if newest is None or pointer == newest.name:
        return newest, None
    skipped = [f"{p.name} ({why_incomplete(p)})" for p in step_folders(ckpt_root)
               if step_number(p) > step_number(newest)]
    said = f"ckpt/{LATEST} names {pointer}" if pointer else f"ckpt/{LATEST} is missing or empty"
    return newest, (f"{said}; the newest complete checkpoint is {newest.name}"
                    + (f" (skipped: {', '.join(skipped)})" if skipped else "") + ": resuming from it")


def prune(ckpt_root: Path, keep: int, just_written: Path | None = None) -> None:
    """Keep the newest `keep` (at least one) complete checkpoints by step number, and always the
    newest one and `just_written`; incomplete step folders are left for a person to look at. Also
    removes temporary folders of killed writers."""
    complete = complete_checkpoints(ckpt_root)
    protected = {p.name for p in complete[-max(keep, 1):]}
    if just_written is not None:
        protected.add(Path(just_written).name)
    for old in complete:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)
    remove_stale_temporaries(ckpt_root)


def remove_stale_temporaries(ckpt_root: Path) -> list[Path]:
    """The temporary step folders and files a killed writer left (never a step_N folder)."""
    ckpt_root = Path(ckpt_root)
    stale = [*ckpt_root.glob(".tmp-step_*"), *ckpt_root.glob(f".{LATEST}.*.tmp")] if ckpt_root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale
