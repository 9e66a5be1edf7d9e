"""`anneal-plan`: what a mixture and a schedule imply per source (documents, tokens, share,
epochs), printed before any GPU time is spent. The numbers come from `mixtures.plan_mixture`.

Two ways in: a recipe (`print_plan(cfg)`: the mixture, stages, seq_len and tokenizer the run
would use) or a mixture file alone (`print_mixture_plan`: stages and tokenizer given by hand).
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from anneal.errors import AnnealError
from anneal.train.schedule import format_tokens, parse_tokens


def plan_tokenizer(cfg, spec):
    """The tokenizer the run would use, without downloading a checkpoint."""
    from mixtures.plan import load_tokenizer

    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer, spec, cfg.data.tokenizer_vocab_size)
    if cfg.checkpoint is None:
        raise AnnealError("checkpoint is null and data.tokenizer is unset: nothing to tokenize with")
    from anneal.checkpoints.catalog import Catalog

    try:
        path = Catalog.load(list(cfg.catalog_files)).resolve(cfg.checkpoint, offline=True).path
    except AnnealError as e:
        raise AnnealError(f"{e}\nFor planning only, data.tokenizer=<a folder with the checkpoint's tokenizer> "
                          "is enough.") from None
    return load_tokenizer(str(Path(path)), spec)


def print_plan(cfg, repeat_warn: float = 4.0) -> list[dict]:
    """The plan of a composed recipe config."""
    from mixtures import load_mixture

    spec = load_mixture(cfg.data.mixture)
    stage_tokens = {s.name: parse_tokens(s.tokens, f"schedule stage {s.name!r} tokens") for s in cfg.schedule.stages}
    return _plan_and_print(spec, plan_tokenizer(cfg, spec), stage_tokens, seq_len=cfg.data.seq_len,
                           repeat_warn=repeat_warn)


def print_mixture_plan(mixture: str, stage_tokens: list[str], *, tokenizer: str = "train",
                       seq_len: int | None = None, vocab_size: int = 4096, repeat_warn: float = 4.0,
                       max_docs: int = 20000, json_path: str | None = None) -> list[dict]:
    """The plan of a mixture file (bundled name or YAML path) for `STAGE=N` token budgets, in
    schedule order. `tokenizer`: a tokenizer folder or tokenizer.json, or "train" (the demo BPE
    trained on the mixture). `json_path`: also write the rows there."""
    from mixtures import load_mixture
    from mixtures.plan import load_tokenizer

    stages = {}
    for item in stage_tokens:
        if "=" not in item:
            raise AnnealError(f"--stage-tokens {item!r}: write STAGE=N, e.g. stage1=20B")
        name, value = item.split("=", 1)
        stages[name] = parse_tokens(value, f"--stage-tokens {name}")
    spec = load_mixture(mixture)
    rows = _plan_and_print(spec, load_tokenizer(tokenizer, spec, vocab_size), stages, seq_len=seq_len,
                           repeat_warn=repeat_warn, max_docs=max_docs)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return rows


def _plan_and_print(spec, tokenizer, stage_tokens: dict[str, int], *, seq_len: int | None,
                    repeat_warn: float, max_docs: int = 20000) -> list[dict]:
    from mixtures import plan_mixture

    rows = plan_mixture(spec, tokenizer, stage_tokens, seq_len=seq_len, repeat_warn=repeat_warn,
                        max_docs=max_docs)
    console = Console(soft_wrap=True)
    console.print(f"mixture {spec.name!r}" + (f", seq_len {seq_len}" if seq_len else "") + ", stages: "
                  + ", ".join(f"{k}={format_tokens(v)}" for k, v in stage_tokens.items()), highlight=False)
    console.print(plan_table(rows), soft_wrap=False)
    from mixtures.plan import plan_notes

    for note in plan_notes(rows):   # whole lines: a warning is read and grepped, not folded
        console.print(note, markup=False, highlight=False)
    return rows


def plan_table(rows: list[dict]):
    """A rich Table of `mixtures.plan_mixture` rows: fits the console, folds cells cleanly."""
    from rich.table import Table

    from mixtures.plan import PLAN_COLUMNS, plan_cells

    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, col in enumerate(PLAN_COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right", overflow="fold")
    for cells in plan_cells(rows):
        table.add_row(*cells)
    return table
