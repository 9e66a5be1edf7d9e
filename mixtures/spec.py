"""What a mixture is once read: its sources, where their data comes from, how their records
become text, and their weights per stage.

These frozen records are what the stream, the planner and the tokenizer builder work from; they
hold no YAML and touch no file. :func:`mixtures.load.load_mixture` builds them from a mixture file
(its module docstring is the schema) and has already validated everything the records assume.

Stages: a stage is any key used in some source's ``weights`` (``default`` excepted). In a
stage, a source that does not list it gets its ``default`` weight, or 0. The trainer checks
the names against its schedule with :meth:`MixtureSpec.check_stages`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from .errors import MixtureError

DEFAULT_STAGE = "default"


def _err(where: str, msg: str) -> MixtureError:
    return MixtureError(f"{where}: {msg}")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where a source's records come from (the ``data`` keys in :mod:`mixtures.load`)."""

    files: tuple[str, ...] = ()          # resolved local files (absolute paths), sorted
    patterns: tuple[str, ...] = ()       # the path entries as written in the YAML
    format: str | None = None
    split_on: str | None = None          # text format: regex; a matching line starts a new document
    sample_by: str = "line"              # text format: line | paragraph | document (datasets' option)
    hub: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    streaming: bool = False              # read through an IterableDataset (see mixtures.streaming)
    shuffle_buffer: int = 10000          # streaming: IterableDataset.shuffle buffer size per epoch
    csv_delimiter: str | None = None


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    data: DataSpec
    text: str                            # template, always with braces: "{text}", "{question}\n{answer}"
    text_fields: tuple[str, ...]         # fields the template reads
    weights: dict                        # stage -> weight, as written (may include "default")
    on_exhausted: str = "repeat"
    on_bad_record: str = "fail"
    heldout_docs: int = 0

    def weight(self, stage: str) -> float:
        if stage in self.weights:
            return float(self.weights[stage])
        return float(self.weights.get(DEFAULT_STAGE, 0.0))


@dataclasses.dataclass(frozen=True, eq=False)   # identity hash: loaded data is cached per spec
class MixtureSpec:
    name: str
    path: str                            # the YAML file it was read from ("<mixture dict>" if given as a dict)
    sources: tuple[SourceSpec, ...]
    heldout_seed: int = 0
    description: str = ""

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def stage_names(self) -> list[str]:
        """Stages named in the sources' weights, in order of first appearance (``default`` excluded)."""
        out: list[str] = []
        for s in self.sources:
            for k in s.weights:
                if k != DEFAULT_STAGE and k not in out:
                    out.append(k)
        return out

    @property
    def has_default(self) -> bool:
        return any(DEFAULT_STAGE in s.weights for s in self.sources)

    def weights(self, stage: str) -> list[float]:
        """Unnormalized weight per source (order of :attr:`source_names`) in ``stage``."""
        if stage not in self.stage_names and not self.has_default:
            raise _err(self.path, f"stage {stage!r} has no weights in this mixture (it names "
                       f"{self.stage_names}); add `{stage}: <weight>` to the sources' `weights`, "
                       f"or a `default:` weight")
        w = [s.weight(stage) for s in self.sources]
        if not sum(w) > 0:
            raise _err(self.path, f"all weights are zero in stage {stage!r}; give at least one "
                       f"source a positive weight for it (or a positive `default`)")
        return w

    def normalized_weights(self, stage: str) -> list[float]:
        w = self.weights(stage)
        t = sum(w)
        return [x / t for x in w]

    def check_stages(self, schedule_stage_names: Sequence[str],
                     active_stages: Sequence[str] | None = None) -> None:
        """Check the mixture's stages against the schedule's.

        Raises :class:`MixtureError` if the mixture names a stage the schedule does not have
        (usually a typo), or if a stage that will run (``active_stages``, by default every
        schedule stage) has no weights here and there is no ``default`` weight to fall back to.
        """
        sched = list(schedule_stage_names)
        unknown = [s for s in self.stage_names if s not in sched]
        if unknown:
            raise _err(self.path, f"the mixture gives weights for stage(s) {unknown} but the "
                       f"schedule's stages are {sched}; rename them in the sources' `weights` "
                       f"(or add the stage to the schedule)")
        active = sched if active_stages is None else list(active_stages)
        missing = [s for s in active if s not in self.stage_names]
        if missing and not self.has_default:
            raise _err(self.path, f"the schedule runs stage(s) {missing} but no source has weights "
                       f"for them; add `{missing[0]}: <weight>` to the sources' `weights`, or a "
                       f"`default: <weight>` entry")
        for s in active:
            self.weights(s)  # all-zero check

    def source(self, name: str) -> SourceSpec:
        for s in self.sources:
            if s.name == name:
                return s
        raise MixtureError(f"{self.path}: no source named {name!r}; sources are {self.source_names}")

    def source_index(self, name: str) -> int:
        return self.source_names.index(self.source(name).name)
