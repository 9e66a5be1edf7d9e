"""Reading source files for `mixtures.sources` and `mixtures.streaming`: compressed text, JSON
lines, `datasets` without progress bars, and the warning class of skipped or repeated data."""
from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
from typing import Iterator


class MixtureWarning(UserWarning):
    """Something was skipped or repeated in a mixture (never silent)."""


@contextlib.contextmanager
def quiet_datasets():
    import datasets
    was = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was:
            datasets.utils.enable_progress_bars()


def open_text(path: str):
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    for ext, fn in opener.items():
        if path.endswith(ext):
            return fn(path, "rt", encoding="utf-8", errors="replace")
    return open(path, "rt", encoding="utf-8", errors="replace")


def json_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a JSON-lines file."""
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def first_bad_json_line(path: str) -> tuple[int, str] | None:
    for n, line in json_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return n, f"invalid JSON ({e.msg} at column {e.colno})"
        if not isinstance(obj, dict):
            return n, f"a JSON {type(obj).__name__}, not an object"
    return None


def root_msg(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
