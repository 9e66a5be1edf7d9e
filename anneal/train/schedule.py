"""Token-indexed learning-rate schedule (WSD with named stages); the batch-size ramp is in
`anneal.train.batch_ramp`.

Everything here is a pure function of the number of training tokens consumed so far. The
schedule keeps no state, so nothing needs to be checkpointed: the trainer stores its token
counter, and after a resume ``lr_at(tokens)`` and ``batch_at(tokens)`` give the same answers.
Tokens are the index (not steps) because the batch size ramps, which changes how many tokens
one step holds.

A schedule is a list of named stages, one after another::

    warmup   0      -> 3e-4   linear     (the only kind of stage whose LR may rise by default)
    stable   3e-4   -> 3e-4   constant
    stage1   3e-4   -> 3e-5   linear     (dots.llm1 anneal stage 1, 1T tokens)
    stage2   3e-5   -> 1e-5   linear     (dots.llm1 anneal stage 2, 200B tokens)

Conventions
-----------
* Stage ``i`` covers the half-open token interval ``[start_i, end_i)``. A token count equal to
  a stage's end belongs to the *next* stage, so ``lr_at(end_i)`` is the next stage's start LR
  (the same number when the schedule is continuous). Past the last stage's end, the last
  stage applies and the LR stays at its ``lr_end``.
* ``lr_start=None`` continues from the previous stage's ``lr_end`` (for the first stage:
  from ``Schedule.start_lr``). An explicit ``lr_start`` makes a deliberate jump.
* Token counts accept ints, integral floats (``1e6``) and strings with decimal suffixes
  ``K`` (1e3), ``M`` (1e6), ``B``/``G`` (1e9), ``T`` (1e12): ``"20B"``, ``"1.5M"``, ``"64K"``.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from anneal.errors import AnnealError
from mixtures.errors import MixtureError
from mixtures.tokens import format_tokens
from mixtures.tokens import parse_tokens as _parse_tokens

__all__ = [
    "SHAPES",
    "Schedule",
    "ScheduleError",
    "Stage",
    "format_tokens",
    "parse_tokens",
]

SHAPES = ("constant", "linear", "cosine", "1-sqrt")


class ScheduleError(AnnealError):
    """An impossible or ambiguous schedule / batch ramp; the message names the stage and field."""


# --------------------------------------------------------------------------- token counts


def parse_tokens(value: Any, what: str = "token count") -> int:
    """:func:`mixtures.tokens.parse_tokens` (the one parser of '20B'-style counts), raising
    :class:`ScheduleError` (same message) instead of ``MixtureError``."""
    try:
        return _parse_tokens(value, what)
    except MixtureError as e:
        raise ScheduleError(str(e)) from None


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One named stage of the schedule.

    ``tokens`` is the stage's length (token budget); ``lr_start=None`` continues from the
    previous stage. ``allow_rise`` permits ``lr_end > lr_start`` in a stage not named
    ``warmup`` (e.g. a re-warmup).
    """

    name: str
    tokens: int
    lr_end: float
    lr_start: float | None = None
    shape: str = "linear"
    allow_rise: bool = False


_STAGE_KEYS = {f.name for f in dataclasses.fields(Stage)}


def _weight(shape: str, p: float) -> float:
    """Weight of lr_start at progress p (1 at p=0, 0 at p=1; exact at both ends)."""
    if shape == "constant":
        return 1.0
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(p)
    raise AssertionError(shape)  # validated at construction


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Schedule:
    """Learning rate as a function of tokens, over named stages. See the module docstring."""

    notes: tuple[str, ...] = ()   # what `anneal.train.build.round_stages_to_steps` changed, one line each

    def __init__(self, stages: Sequence[Stage], start_lr: float = 0.0):
        if not _is_number(start_lr) or start_lr < 0:
            raise ScheduleError(f"schedule start_lr must be a finite number >= 0, got {start_lr!r}")
        stages = list(stages)
        if not stages:
            raise ScheduleError(
                "schedule has no stages; give at least one, e.g. "
                "stages: [{name: stage1, tokens: 1T, lr_end: 3e-5}]"
            )
        self.start_lr = float(start_lr)
        normalized: list[Stage] = []
        starts: list[float] = []  # resolved start LR of each stage
        seen: dict[str, int] = {}
        prev_end_lr = self.start_lr
        for i, st in enumerate(stages):
            if not isinstance(st, Stage):
                raise ScheduleError(f"schedule stage at index {i}: expected a Stage, got {type(st).__name__}")
            where = f"schedule stage {st.name!r} (index {i})"
            if not isinstance(st.name, str) or not st.name:
                raise ScheduleError(f"schedule stage at index {i}: field 'name' must be a non-empty string, got {st.name!r}")
            if st.name in seen:
                raise ScheduleError(
                    f"{where}: field 'name' duplicates stage index {seen[st.name]}; "
                    f"stage names must be unique, rename one of them"
                )
            seen[st.name] = i
            tokens = parse_tokens(st.tokens, f"{where}: field 'tokens'")
            if tokens <= 0:
                raise ScheduleError(
                    f"{where}: field 'tokens' must be > 0, got {st.tokens!r}; give the stage a "
                    f"positive token budget (e.g. tokens: 20B) or remove the stage"
                )
            shape = st.shape.strip().lower() if isinstance(st.shape, str) else st.shape
            if shape not in SHAPES:
                raise ScheduleError(
                    f"{where}: field 'shape' is {st.shape!r}, which is not a known shape; "
                    f"use one of {', '.join(SHAPES)}"
                )
            for field in ("lr_end", "lr_start"):
                v = getattr(st, field)
                if field == "lr_start" and v is None:
                    continue
                if not _is_number(v):
                    raise ScheduleError(f"{where}: field '{field}' must be a finite number, got {v!r}")
                if v < 0:
                    raise ScheduleError(f"{where}: field '{field}' must be >= 0, got {v!r}; learning rates cannot be negative")
            lr_start = prev_end_lr if st.lr_start is None else float(st.lr_start)
            lr_end = float(st.lr_end)
            origin = (
                "set by lr_start" if st.lr_start is not None
                else ("continued from start_lr" if i == 0 else f"continued from stage {stages[i - 1].name!r}")
            )
            if shape == "constant" and not math.isclose(lr_end, lr_start, rel_tol=1e-12, abs_tol=0.0):
                raise ScheduleError(
                    f"{where}: field 'lr_end' is {lr_end:g} but a constant stage must end at its start "
                    f"LR {lr_start:g} ({origin}); set lr_end: {lr_start:g} or use shape linear/cosine/1-sqrt"
                )
            rising = lr_end > lr_start and not math.isclose(lr_end, lr_start, rel_tol=1e-12, abs_tol=0.0)
            if rising and st.name.lower() != "warmup" and not st.allow_rise:
                raise ScheduleError(
                    f"{where}: field 'lr_end' {lr_end:g} is above the stage's start LR {lr_start:g} "
                    f"({origin}); the LR may only rise in a stage named 'warmup' or one with "
                    f"allow_rise: true. Lower lr_end, or set allow_rise: true if the rise is intended"
                )
            normalized.append(dataclasses.replace(st, tokens=tokens, shape=shape, lr_end=lr_end,
                                                  lr_start=None if st.lr_start is None else lr_start))
            starts.append(lr_start)
            prev_end_lr = lr_end
        self.stages: tuple[Stage, ...] = tuple(normalized)
        self._lr_starts = tuple(starts)
        ends, total = [], 0
        for st in self.stages:
            total += st.tokens
            ends.append(total)
        self._ends = tuple(ends)
        self._index = {st.name: i for i, st in enumerate(self.stages)}

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_config(cls, cfg: Any) -> Schedule:
        """Build from a dict / OmegaConf node.

        ``{start_lr: 0.0, stages: [{name: warmup, tokens: 2B, lr_end: 3e-4}, ...]}``. ``stages``
        may also be a mapping ``{warmup: {tokens: 2B, lr_end: 3e-4}, stable: {...}}`` (order
        kept), which lets Hydra override one stage by name: ``schedule.stages.stage1.tokens=20B``.
        Unknown keys are errors (a typo such as ``lr_ned`` must not pass silently).
        """
        cfg = to_container(cfg)
        if not isinstance(cfg, Mapping):
            raise ScheduleError(f"schedule config must be a mapping with 'stages', got {type(cfg).__name__}")
        unknown = set(cfg) - {"start_lr", "stages"}
        if unknown:
            raise ScheduleError(
                f"schedule config: unknown key(s) {sorted(unknown)}; allowed keys are start_lr and stages"
            )
        raw = cfg.get("stages")
        if raw is None:
            raise ScheduleError("schedule config: key 'stages' is missing; give a list of stages")
        if isinstance(raw, Mapping):
            items = []
            for name, spec in raw.items():
                spec = dict(spec) if isinstance(spec, Mapping) else spec
                if isinstance(spec, dict):
                    if "name" in spec and spec["name"] != name:
                        raise ScheduleError(
                            f"schedule stage {name!r}: field 'name' is {spec['name']!r} but the stage is "
                            f"keyed {name!r}; drop the name field or make them match"
                        )
                    spec["name"] = name
                items.append(spec)
        elif isinstance(raw, Sequence) and not isinstance(raw, str):
            items = list(raw)
        else:
            raise ScheduleError(f"schedule config: 'stages' must be a list of stages, got {raw!r}")
        stages = []
        for i, spec in enumerate(items):
            if not isinstance(spec, Mapping):
                raise ScheduleError(f"schedule stage at index {i}: expected a mapping with name, tokens, lr_end; got {spec!r}")
            name = spec.get("name")
            where = f"schedule stage {name!r} (index {i})" if name is not None else f"schedule stage at index {i}"
            unknown = set(spec) - _STAGE_KEYS
            if unknown:
                raise ScheduleError(
                    f"{where}: unknown field(s) {sorted(unknown)}; allowed fields are {sorted(_STAGE_KEYS)}"
                )
            for key in ("name", "tokens", "lr_end"):
                if spec.get(key) is None:
                    raise ScheduleError(f"{where}: field '{key}' is missing")
            kwargs = dict(spec)
            kwargs["tokens"] = parse_tokens(spec["tokens"], f"{where}: field 'tokens'")
            for key in ("lr_end", "lr_start"):
                if isinstance(kwargs.get(key), str):  # YAML reads '3e-4' (no dot) as a string
                    try:
                        kwargs[key] = float(kwargs[key])
                    except ValueError:
                        raise ScheduleError(f"{where}: field '{key}' must be a number, got {spec[key]!r}") from None
            stages.append(Stage(**kwargs))
        start_lr = cfg.get("start_lr", 0.0)
        if isinstance(start_lr, str):
            try:
                start_lr = float(start_lr)
            except ValueError:
                raise ScheduleError(f"schedule start_lr must be a number, got {start_lr!r}") from None
        return cls(stages, start_lr=start_lr)

    def to_config(self) -> dict:
        """Plain dict that :meth:`from_config` turns back into an equal schedule (for logs)."""
        stages = []
        for st in self.stages:
            d = {"name": st.name, "tokens": st.tokens, "lr_end": st.lr_end, "shape": st.shape}
            if st.lr_start is not None:
                d["lr_start"] = st.lr_start
            if st.allow_rise:
                d["allow_rise"] = True
            stages.append(d)
        return {"start_lr": self.start_lr, "stages": stages}

    @classmethod
    def dots1_anneal(
        cls,
        stage1_tokens: int | str,
        stage2_tokens: int | str,
        start_lr: float = 3e-4,
        shape: str = "linear",
        stage1_lr_end: float = 3e-5,
        stage2_lr_end: float = 1e-5,
    ) -> Schedule:
        """The dots.llm1 two-phase anneal: ``stage1`` start_lr -> 3e-5, ``stage2`` 3e-5 -> 1e-5.

        The report used 1T + 200B tokens; pass smaller budgets for a workbench run. The decay
        shape is not stated in the report (linear is our default; ``shape`` overrides both).
        """
        return cls(
            [
                Stage("stage1", parse_tokens(stage1_tokens, "dots1_anneal stage1_tokens"), stage1_lr_end, shape=shape),
                Stage("stage2", parse_tokens(stage2_tokens, "dots1_anneal stage2_tokens"), stage2_lr_end, shape=shape),
            ],
            start_lr=start_lr,
        )

    def with_start_lr(self, lr: float) -> Schedule:
        """Copy whose first stage starts at ``lr`` (anneal from a checkpoint at its LR).

        A first stage with an explicit ``lr_start`` has it replaced. If the first stage is
        constant it stays constant, at ``lr``; stages that continue from it then continue
        from ``lr``. Raises :class:`ScheduleError` if that makes the first stage rise.
        """
        first = self.stages[0]
        first = dataclasses.replace(first, lr_start=None, lr_end=lr if first.shape == "constant" else first.lr_end)
        return Schedule([first, *self.stages[1:]], start_lr=lr)

    # ------------------------------------------------------------------ queries

    @property
    def total_tokens(self) -> int:
        return self._ends[-1]

    @property
    def stage_names(self) -> list[str]:
        return [st.name for st in self.stages]

    def _idx(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ScheduleError(f"schedule has no stage named {name!r}; stages are {self.stage_names}") from None

    def stage(self, name: str) -> Stage:
        return self.stages[self._idx(name)]

    def stage_start(self, name: str) -> int:
        """Token count at which the stage begins (inclusive)."""
        i = self._idx(name)
        return self._ends[i - 1] if i else 0

    def stage_end(self, name: str) -> int:
        """Token count at which the stage ends (exclusive: it belongs to the next stage)."""
        return self._ends[self._idx(name)]

    def stage_lr_start(self, name: str) -> float:
        """The stage's resolved start LR (its lr_start, or the LR it continues from)."""
        return self._lr_starts[self._idx(name)]

    def _stage_index_at(self, tokens: float) -> int:
        if not (isinstance(tokens, (int, float)) and not isinstance(tokens, bool)) or tokens < 0 or tokens != tokens:
            raise ScheduleError(f"token count must be a number >= 0, got {tokens!r}")
        return min(bisect.bisect_right(self._ends, tokens), len(self.stages) - 1)

    def stage_at(self, tokens: int) -> Stage:
        """Stage containing ``tokens``; a stage's end token belongs to the next stage; past the end: the last."""
        return self.stages[self._stage_index_at(tokens)]

    def stage_lr(self, index: int, progress: float) -> float:
        """LR of stage ``index`` at ``progress`` in [0, 1] (1 gives its lr_end; used for plots)."""
        st = self.stages[index]
        w = _weight(st.shape, min(max(progress, 0.0), 1.0))
        return w * self._lr_starts[index] + (1.0 - w) * st.lr_end

    def lr_at(self, tokens: int) -> float:
        """Learning rate after ``tokens`` tokens."""
        i = self._stage_index_at(tokens)
        start = self._ends[i - 1] if i else 0
        return self.stage_lr(i, (tokens - start) / self.stages[i].tokens)

    # ------------------------------------------------------------------ misc

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return self.start_lr == other.start_lr and self.stages == other.stages

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{st.name}: {format_tokens(st.tokens)} {st.shape} {self._lr_starts[i]:g}->{st.lr_end:g}"
            for i, st in enumerate(self.stages)
        )
        return f"Schedule({parts})"


def to_container(cfg: Any) -> Any:
    """OmegaConf node -> plain Python (resolving interpolations); anything else unchanged."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
