"""Accounting: exactly what the returned batches held, per source and per stage, and its table.

The counters are part of a stream's resume state, so a resumed run reports the same totals as an
uninterrupted one. :func:`format_accounting` puts each stage's shares next to the shares the
mixture asks for: a stage shorter than a source's documents cannot meet them (the sampler keeps
every source within one document of its share), and the table says so.
"""
from __future__ import annotations

import numpy as np

from .spec import MixtureSpec


class TokenAccounting:
    """Per source: ``tokens`` returned (EOS included), ``documents`` whose first token was
    returned, and tokens per stage; plus the rows returned so far."""

    def __init__(self, n_sources: int):
        self.tokens = [0] * n_sources
        self.documents = [0] * n_sources
        self.stage_tokens: dict[str, list[int]] = {}   # stage -> tokens per source
        self.rows = 0

    def count(self, src: np.ndarray, docstart: np.ndarray, stage: str, n_rows: int) -> None:
        """Count the token span of ``n_rows`` returned rows (source id and document start per
        token). After the first batch, the span's first token was the previous batch's last,
        counted then."""
        n = len(self.tokens)
        first = 0 if self.rows == 0 else 1
        per_token = np.bincount(src[first:], minlength=n)
        per_doc = np.bincount(src[first:][docstart[first:]], minlength=n)
        per_stage = self.stage_tokens.setdefault(stage, [0] * n)
        for i in range(n):
            self.tokens[i] += int(per_token[i])
            self.documents[i] += int(per_doc[i])
            per_stage[i] += int(per_token[i])
        self.rows += n_rows

    def state_dict(self) -> dict:
        return {
            "sequences": self.rows,
            "acct_tokens": list(self.tokens),
            "acct_docs": list(self.documents),
            "acct_stage_tokens": {k: list(v) for k, v in self.stage_tokens.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        self.rows = int(sd["sequences"])
        self.tokens = [int(x) for x in sd["acct_tokens"]]
        self.documents = [int(x) for x in sd["acct_docs"]]
        self.stage_tokens = {k: [int(x) for x in v] for k, v in sd.get("acct_stage_tokens", {}).items()}


def stage_shares(spec: MixtureSpec) -> dict[str, dict[str, float]]:
    """stage -> source -> the share the mixture asks for (normalized weights)."""
    return {st: dict(zip(spec.source_names, spec.normalized_weights(st))) for st in spec.stage_names}


def format_accounting(acc: dict, targets: dict[str, dict[str, float]] | None = None, off_by: float = 0.05) -> str:
    """A small table of an accounting dict (:meth:`PackedMixtureStream.accounting`) for the
    console/log: the whole run, then each stage's share with its target in brackets and ``!``
    where they differ by more than ``off_by`` (whole documents at a short stage), then a warning."""
    total = sum(a["tokens"] for a in acc.values()) or 1
    stages = list(dict.fromkeys(st for a in acc.values() for st in a.get("stage_tokens", {})))
    stage_total = {st: sum(a.get("stage_tokens", {}).get(st, 0) for a in acc.values()) or 1 for st in stages}
    lines = [f"{'source':<16}{'tokens':>14}{'share':>8}{'docs':>10}{'epochs':>9}"
             + "".join(f"{st:>18}" for st in stages)]
    off = []
    for name, a in acc.items():
        cells = ""
        for st in stages:
            got = a.get("stage_tokens", {}).get(st, 0) / stage_total[st]
            want = (targets or {}).get(st, {}).get(name)
            bad = want is not None and abs(got - want) > off_by
            off += [(st, name, got, want)] if bad else []
            cells += f"{got:>10.1%}" + (f" ({want:.0%})" if want is not None else "").rjust(7) + ("!" if bad else " ")
        lines.append(f"{name:<16}{a['tokens']:>14,}{a['tokens'] / total:>8.1%}"
                     f"{a['documents']:>10,}{a['epochs']:>9.3f}" + cells)
    for st, name, got, want in off:
        lines.append(f"WARNING {st}/{name}: {got:.1%} of the stage's tokens, asked {want:.0%}: the stage is short "
                     "next to this mixture's documents (whole documents); lengthen it (anneal-plan shows the sizes)")
    return "\n".join(lines)
