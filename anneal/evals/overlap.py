"""Held-out means held out: no scored item of a benchmark task may be in the training mixture.

Each scored item's `overlap_fields` (by default the fields its prompt template uses; the
question, the HumanEval prompt, the review) are looked for, whitespace-normalized, as substrings
of every training document of every local source of the mixture (the documents the sampler
draws from; a source's own held-out documents are not training data). Texts shorter than
`MIN_CHARS` (a label, a number) are not checked: they occur everywhere by chance. Streaming (hub)
sources cannot be read in full before training and are reported as unchecked.
"""
from __future__ import annotations

from anneal.errors import AnnealError
from anneal.evals.tasks import Task

MIN_CHARS = 24
_CHUNK_DOCS = 2000


def _norm(text: str) -> str:
    return " ".join(text.split())


def find_overlaps(tasks: list[Task], spec) -> tuple[list[tuple[str, int, str, str]], list[str]]:
    """([(task, item index, field, source)] of scored items found in training documents),
    [streaming sources not checked])."""
    from mixtures.sources import load_sources

    needles = [(t.name, i, f, _norm(str(item[f]))) for t in tasks for i, item in enumerate(t.items)
               for f in t.overlap_fields]
    needles = [n for n in needles if len(n[3]) >= MIN_CHARS]
    found, unchecked = [], []
    for src in load_sources(spec):
        if src.streaming:
            unchecked.append(src.spec.name)
            continue
        docs = list(src.train_texts())
        for start in range(0, len(docs), _CHUNK_DOCS):
            text = "\x00".join(_norm(d) for d in docs[start:start + _CHUNK_DOCS])
            hits = [n for n in needles if n[3] in text]
            found += [(name, i, f, src.spec.name) for name, i, f, _ in hits]
            needles = [n for n in needles if n not in hits]
    return found, unchecked


def check_no_overlap(tasks: list[Task], spec) -> list[str]:
    """AnnealError for the first scored item found in the training mixture; returns the
    streaming sources that could not be checked."""
    found, unchecked = find_overlaps(tasks, spec)
    if found:
        name, i, f, source = found[0]
        more = f" ({len(found) - 1} more)" if len(found) > 1 else ""
        raise AnnealError(f"eval task {name}: item {i} field {f!r} is in the training mixture "
                          f"{spec.name} (source {source}){more}; a benchmark item must be held out: take it "
                          f"out of the task's data, or raise the source's heldout_docs / drop it from the mixture")
    return unchecked
