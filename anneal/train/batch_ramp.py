"""Batch size in tokens as a step function of the tokens consumed (the batch ramp).

Like the LR schedule (`anneal.train.schedule`) it is a pure function of the token counter, so a
resumed run gets the same batch sizes; token counts take the same '64M'-style strings.
"""
from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

from anneal.train.schedule import ScheduleError, format_tokens, parse_tokens, to_container


class BatchRamp:
    """Batch size in tokens as a step function of tokens consumed.

    ``points = [(0, 64M), (from_b, 96M), (from_c, 128M)]``: from each ``from_tokens`` on
    (inclusive) the batch is ``batch_tokens``. The first point must start at 0 and the
    ``from`` values must strictly increase.
    """

    def __init__(self, points: Sequence[tuple[Any, Any]]):
        points = list(points)
        if not points:
            raise ScheduleError("batch ramp has no points; give at least [(0, batch_tokens)]")
        froms, batches = [], []
        for i, pt in enumerate(points):
            if not (isinstance(pt, Sequence) and not isinstance(pt, str) and len(pt) == 2):
                raise ScheduleError(f"batch ramp point {i}: expected (from_tokens, batch_tokens), got {pt!r}")
            f = parse_tokens(pt[0], f"batch ramp point {i}: field 'from'")
            b = parse_tokens(pt[1], f"batch ramp point {i}: field 'batch_tokens'")
            if b <= 0:
                raise ScheduleError(f"batch ramp point {i}: field 'batch_tokens' must be > 0, got {pt[1]!r}")
            if i == 0 and f != 0:
                raise ScheduleError(
                    f"batch ramp point 0: field 'from' must be 0 (the batch size must be defined from "
                    f"the first token), got {pt[0]!r}"
                )
            if froms and f <= froms[-1]:
                raise ScheduleError(
                    f"batch ramp point {i}: field 'from' {pt[0]!r} must be greater than the previous "
                    f"point's {format_tokens(froms[-1])}; list the points in increasing 'from' order"
                )
            froms.append(f)
            batches.append(b)
        self._froms = tuple(froms)
        self._batches = tuple(batches)

    @classmethod
    def constant(cls, batch_tokens: int | str) -> BatchRamp:
        return cls([(0, batch_tokens)])

    @classmethod
    def from_config(cls, cfg: Any) -> BatchRamp:
        """An int / token string (constant batch), or a list of ``{from: 0, batch_tokens: 64M}``
        (``[from, batch_tokens]`` pairs also accepted)."""
        cfg = to_container(cfg)
        if isinstance(cfg, (int, float, str)) and not isinstance(cfg, bool):
            return cls.constant(cfg)
        if not (isinstance(cfg, Sequence) and not isinstance(cfg, str)):
            raise ScheduleError(
                f"batch ramp config must be a token count (e.g. 64M) or a list of "
                f"{{from: ..., batch_tokens: ...}}, got {cfg!r}"
            )
        points = []
        for i, item in enumerate(cfg):
            if isinstance(item, Mapping):
                unknown = set(item) - {"from", "batch_tokens"}
                missing = {"from", "batch_tokens"} - set(item)
                if unknown or missing:
                    raise ScheduleError(
                        f"batch ramp point {i}: fields must be exactly 'from' and 'batch_tokens'"
                        + (f"; unknown {sorted(unknown)}" if unknown else "")
                        + (f"; missing {sorted(missing)}" if missing else "")
                    )
                points.append((item["from"], item["batch_tokens"]))
            else:
                points.append(item)
        return cls(points)

    @property
    def points(self) -> list[tuple[int, int]]:
        return list(zip(self._froms, self._batches))

    def batch_at(self, tokens: int) -> int:
        """Batch size (tokens) for the step that starts after ``tokens`` tokens."""
        if not (isinstance(tokens, (int, float)) and not isinstance(tokens, bool)) or tokens < 0 or tokens != tokens:
            raise ScheduleError(f"token count must be a number >= 0, got {tokens!r}")
        return self._batches[bisect.bisect_right(self._froms, tokens) - 1]

    def to_config(self) -> list[dict]:
        return [{"from": f, "batch_tokens": b} for f, b in self.points]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BatchRamp):
            return NotImplemented
        return self.points == other.points

    def __repr__(self) -> str:
        return "BatchRamp(" + ", ".join(f"{format_tokens(f)}: {format_tokens(b)}" for f, b in self.points) + ")"
