"""Write a file whole or not at all: into a hidden temporary file beside it, then `os.replace`
(atomic on POSIX within one filesystem), so a reader or a killed writer never sees half a file."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` writes the content to a temporary path; it then replaces `path`. On any
    error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))
