"""`anneal-plan`: what a recipe's mixture and schedule imply per source (documents, tokens, share,
epochs), printed before any GPU time is spent. The numbers come from `mixtures.plan_mixture`."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from anneal.errors import AnnealError
from anneal.schedule import format_tokens, parse_tokens


def plan_tokenizer(cfg, spec):
    """The tokenizer the run would use, without downloading a checkpoint."""
    from mixtures.plan import load_tokenizer

    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer, spec, cfg.data.tokenizer_vocab_size)
    if cfg.checkpoint is None:
        raise AnnealError("checkpoint is null and data.tokenizer is unset: nothing to tokenize with")
    from anneal.catalog import Catalog

    try:
        path = Catalog.load(list(cfg.catalog_files)).resolve(cfg.checkpoint, offline=True).path
    except AnnealError as e:
        raise AnnealError(f"{e}\nFor planning only, data.tokenizer=<a folder with the checkpoint's tokenizer> "
                          "is enough.") from None
    return load_tokenizer(str(Path(path)), spec)


def print_plan(cfg, repeat_warn: float = 4.0) -> list[dict]:
    from mixtures import format_plan, load_mixture, plan_mixture

    spec = load_mixture(cfg.data.mixture)
    stage_tokens = {s.name: parse_tokens(s.tokens, f"schedule stage {s.name!r} tokens") for s in cfg.schedule.stages}
    rows = plan_mixture(spec, plan_tokenizer(cfg, spec), stage_tokens, seq_len=cfg.data.seq_len,
                        repeat_warn=repeat_warn)
    console = Console()
    console.print(f"mixture {spec.name!r}, seq_len {cfg.data.seq_len}, stages: "
                  + ", ".join(f"{k}={format_tokens(v)}" for k, v in stage_tokens.items()))
    print(format_plan(rows))  # a fixed-width table: plain print, never wrapped
    return rows
