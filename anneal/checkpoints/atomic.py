"""Durable writes: a file is written whole or not at all, and survives a host crash once written.

The content goes into a hidden temporary file beside the target, is fsync'd, and replaces the
target by `os.replace` (atomic on POSIX within one filesystem); the folder is then fsync'd so the
rename itself is on the disk. A reader or a killed writer never sees half a file, and after a
power loss the path holds the old content or the new, never an empty or torn file."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to the disk (a folder: its list of names, so a rename
    into it survives a host crash)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file of `folder` (not recursive: a step folder is flat) and then the folder itself."""
    for p in Path(folder).iterdir():
        if p.is_file():
            fsync_path(p)
    fsync_path(folder)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` writes the content to a temporary path; it is fsync'd and then replaces
    `path`. On any error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))
