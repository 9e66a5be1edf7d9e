"""What is checked before a checkpoint or an export is written: the weights are finite, and the
disk has room for them; a full disk met while writing becomes one message (the writers leave the
previous checkpoint intact)."""
from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from anneal.errors import AnnealError

MARGIN = 0.05            # on top of the tensors: JSON, headers, filesystem slack
MIN_MARGIN_BYTES = 64 << 20


class DiskFullError(AnnealError):
    """No room for a checkpoint or an export: the run stops; nothing written is lost."""


class NonFiniteWeightsError(AnnealError):
    """Weights with NaN/inf are never written as a checkpoint or an export."""


class CorruptCheckpointError(AnnealError):
    """A checkpoint file that is damaged (truncated, foreign bytes, NaN/inf where none was written)."""


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _existing(folder: Path) -> Path:
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def ensure_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """DiskFullError unless the filesystem of `folder` has `need_bytes` plus the margin free."""
    need = int(need_bytes * (1 + MARGIN)) + MIN_MARGIN_BYTES
    free = shutil.disk_usage(_existing(folder)).free
    if free < need:
        raise DiskFullError(f"{what}: needs about {_gb(need)} in {folder} but the disk has {_gb(free)} free; "
                            "free some space (or point run.root / export.dir elsewhere) and resume with "
                            "run.resume=true")


@contextmanager
def reporting_full_disk(what: str, folder: Path, need_bytes: int):
    """An ENOSPC/EDQUOT/EFBIG while writing becomes DiskFullError, any other OSError one AnnealError
    line naming the file (the caller removes its partial files)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise AnnealError(f"{what}: writing {e.filename or folder} failed ({e.strerror or e}). Nothing was lost: "
                              "the partial files were removed and the previous checkpoint is intact. Fix the disk "
                              "(permissions, mount) and resume with run.resume=true") from None
        raise DiskFullError(f"{what}: the disk filled up while writing to {folder} (about {_gb(need_bytes)} "
                            f"needed; {e.strerror}). Nothing was lost: the partial files were removed and the "
                            "previous checkpoint is intact. Free some space and resume with run.resume=true") from None


def first_nonfinite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity (one device read)."""
    names = [k for k, v in tensors.items() if v.is_floating_point() and v.numel()]
    if not names:
        return None
    device = tensors[names[0]].device
    finite = torch.stack([torch.isfinite(tensors[k]).all().to(device) for k in names]).cpu()
    bad = (~finite).nonzero()
    return names[int(bad[0])] if len(bad) else None
