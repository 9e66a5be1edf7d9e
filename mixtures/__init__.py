"""Data mixtures for annealing: sources, weights per stage, packing, a resumable sampler.

Public API::

    from mixtures import load_mixture, build_tokenizer_from_corpus, PackedMixtureStream
    spec = load_mixture("demo")                 # bundled name or YAML path
    tok = build_tokenizer_from_corpus(spec, vocab_size=4096)
    stream = PackedMixtureStream(spec, tok, seq_len=256, seed=1234, stage="stage1")
    batch = stream.next_batch(8)                # input_ids / position_ids / source_ids [8, 257]

Names are imported lazily (PEP 562) so that background tokenization workers, which import
``mixtures._tokenize``, do not pay for torch and transformers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "MixtureError": "errors",
    "MixtureExhausted": "errors",
    "MixtureWarning": "sources",
    "MixtureSpec": "spec",
    "SourceSpec": "spec",
    "DataSpec": "spec",
    "load_mixture": "load",
    "bundled_mixtures": "load",
    "build_tokenizer_from_corpus": "tokenizer",
    "PackedMixtureStream": "stream",
    "TokenFairSampler": "sampler",
    "ShardedStream": "shards",
    "rank_shards": "shards",
    "plan_mixture": "plan",
    "format_plan": "plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'mixtures' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
