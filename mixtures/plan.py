"""Plan a mixture before running it: tokens per source and stage, implied epochs, warnings.

The core is :func:`plan_mixture`; :func:`format_plan` renders the rows. The command is
``anneal-plan`` (a recipe) or ``anneal-plan mixture FILE --stage-tokens stage1=20B ...`` (a
mixture file alone). Epochs are cumulative over the stages in the order given (the schedule's
order).
"""
from __future__ import annotations

import numpy as np

from ._tokenize import make_encoder
from .sources import load_sources
from .spec import MixtureSpec
from .tokens import parse_tokens  # the one parser of '20B'-style token counts


def source_token_counts(spec: MixtureSpec, tokenizer, max_docs: int = 20000, seed: int = 0):
    """Per source: (training documents, tokens in one pass incl. EOS, estimated?). Sources with
    more than ``max_docs`` training documents are estimated from a fixed random sample.
    Streaming sources of unknown size: (None, None, True)."""
    encode = make_encoder(tokenizer)
    out = []
    for src in load_sources(spec):
        if src.streaming:
            n_docs, n_tok = 0, 0
            for i, text in enumerate(src.train_texts(limit=max_docs + 1)):
                if i < max_docs:
                    n_tok += len(encode([text])[0])
                n_docs += 1
            if n_docs <= max_docs:       # read to the end: exact
                out.append((n_docs, n_tok, False))
            else:
                out.append((None, None, True))
            continue
        idx = src.train_idx
        est = len(idx) > max_docs
        if est:
            idx = np.sort(np.random.default_rng(seed).choice(idx, max_docs, replace=False))
        n = 0
        for i in range(0, len(idx), 256):
            n += sum(len(d) for d in encode(src.texts(idx[i:i + 256])))
        if est:
            n = int(round(n * len(src.train_idx) / max_docs))
        out.append((len(src.train_idx), n, est))
    return out


def plan_mixture(spec: MixtureSpec, tokenizer, stage_tokens: dict, *, seq_len: int | None = None,
                 repeat_warn: float = 4.0, max_docs: int = 20000) -> list[dict]:
    """One row per (stage, source), stages in the order of ``stage_tokens``.

    Row keys: ``stage, source, docs`` (training documents), ``source_tokens`` (one pass,
    EOS included), ``estimated`` (source_tokens from a sample), ``share`` (normalized weight),
    ``tokens`` (share x stage tokens), ``sequences`` (tokens / seq_len, if given),
    ``epochs`` (passes in this stage), ``cum_epochs`` (passes up to the end of this stage),
    ``warning`` (None or text: above ``repeat_warn`` passes, a ``stop`` source running out, or a
    stage too short for the source's share: less than one of its average documents).
    For a ``stop`` source that runs out, ``tokens`` is what it has left and the others' rows
    are not re-scaled (a plan, not a simulation; the warning says so).
    """
    stage_tokens = {k: parse_tokens(v) for k, v in stage_tokens.items()}
    for stage in stage_tokens:      # only the planned stages must have weights
        spec.weights(stage)
    counts = source_token_counts(spec, tokenizer, max_docs=max_docs)
    used = [0.0] * len(spec.sources)
    rows = []
    for stage, total in stage_tokens.items():
        shares = spec.normalized_weights(stage)
        for i, (src, share) in enumerate(zip(spec.sources, shares)):
            docs, ntok, est = counts[i]
            want = share * total
            warning = None
            if ntok is None:        # streaming source of unknown size
                used[i] += want
                rows.append({
                    "stage": stage, "source": src.name, "docs": None, "source_tokens": None,
                    "estimated": True, "share": share, "tokens": int(round(want)),
                    "sequences": (int(want // seq_len) if seq_len else None),
                    "epochs": None, "cum_epochs": None,
                    "warning": (f"streaming source larger than {max_docs} documents: size unknown, "
                                f"epochs not computed") if want > 0 else None,
                })
                continue
            if src.on_exhausted == "stop" and used[i] + want > ntok:
                left = max(0.0, ntok - used[i])
                if want > 0:
                    warning = (f"runs out after {left / want:.0%} of {stage} (on_exhausted: stop); "
                               f"the other sources then share its weight")
                want = left
            used[i] += want
            cum = used[i] / ntok if ntok else float("inf")
            if warning is None and cum > repeat_warn and want > 0:
                warning = (f"{cum:.1f} passes over this source by the end of {stage} "
                           f"(> {repeat_warn:g}); repeated data, consider more data or a lower weight")
            mean_doc = ntok / docs if docs else 0
            if warning is None and 0 < want < mean_doc:
                warning = (f"its {_human(want)} tokens of {stage} are less than one of its average documents "
                           f"({_human(mean_doc)} tokens): documents are whole, so the stage's shares cannot be met; "
                           f"lengthen {stage}")
            rows.append({
                "stage": stage, "source": src.name, "docs": docs, "source_tokens": ntok,
                "estimated": est, "share": share, "tokens": int(round(want)),
                "sequences": (int(want // seq_len) if seq_len else None),
                "epochs": want / ntok if ntok else float("inf"), "cum_epochs": cum,
                "warning": warning,
            })
    return rows


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


PLAN_COLUMNS = ("stage", "source", "docs", "src tokens", "share", "tokens", "epochs", "cum ep", "")


def plan_cells(rows: list[dict]) -> list[list[str]]:
    """The cells of :func:`plan_mixture` rows as strings, one list per row (:data:`PLAN_COLUMNS`;
    the last cell is ``!`` for a row with a warning)."""
    def num(x, fmt):
        return "?" if x is None else format(x, fmt)

    return [[r["stage"], r["source"], num(r["docs"], ","),
             "?" if r["source_tokens"] is None else _human(r["source_tokens"]) + ("~" if r["estimated"] else ""),
             f"{r['share']:.1%}", _human(r["tokens"]), num(r["epochs"], ".2f"), num(r["cum_epochs"], ".2f"),
             "!" if r["warning"] else ""] for r in rows]


def plan_notes(rows: list[dict]) -> list[str]:
    """The lines under the table: the ``~`` legend and one line per warning."""
    notes = ["~ estimated from a sample of the source's documents"] if any(r["estimated"] for r in rows) else []
    return notes + [f"WARNING {r['stage']}/{r['source']}: {r['warning']}" for r in rows if r["warning"]]


def format_plan(rows: list[dict]) -> str:
    """A plain-text table of :func:`plan_mixture` rows (columns as wide as their widest cell, two
    spaces apart: numbers never run together), then the warnings."""
    cells = plan_cells(rows)
    widths = [max(len(c) for c in col) for col in zip(PLAN_COLUMNS, *cells)]

    def line(row):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    head = line(PLAN_COLUMNS)
    return "\n".join([head, "-" * len(head), *map(line, cells), *plan_notes(rows)])


def load_tokenizer(name: str, spec: MixtureSpec | None = None, vocab_size: int = 4096):
    """``"train"``: :func:`build_tokenizer_from_corpus` on ``spec``; else a tokenizer folder
    (``AutoTokenizer.from_pretrained``) or a ``tokenizer.json`` file."""
    if name == "train":
        from .tokenizer import build_tokenizer_from_corpus
        return build_tokenizer_from_corpus(spec, vocab_size=vocab_size)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if name.endswith(".json"):
        return PreTrainedTokenizerFast(tokenizer_file=name)
    return AutoTokenizer.from_pretrained(name)

