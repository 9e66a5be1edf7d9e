"""The data of one data-parallel rank: some of the ``n_shards`` disjoint shards of a mixture.

Why shards: a rank that read the whole mixture and kept its rows would tokenize ``world`` times
the data it trains on. Instead the mixture is split into ``n_shards`` disjoint streams
(:class:`~mixtures.stream.PackedMixtureStream` with ``shard=(i, n_shards)``: shard ``i`` owns
documents ``i, i+n, ...`` of every epoch's order) and each rank samples, tokenizes and packs only
its own shards. A batch of ``n`` rows is ``n / k`` rows from each of the rank's ``k`` shards, in
shard order; rank ``r`` of ``w`` holds shards ``[r*k, (r+1)*k)`` with ``k = n_shards / w``.

So the data is a function of ``n_shards``, not of the number of ranks: in a step of ``S`` rows,
every shard gives its next ``S / n_shards`` rows whatever ``w`` is (one process with ``n_shards=2``
trains on the same rows per step as two ranks), and a run can resume on another number of ranks
that divides ``n_shards``. The state is one small dict per shard.
"""
from __future__ import annotations

import torch

from .accounting import format_accounting, stage_shares
from .errors import MixtureError
from .stream import PackedMixtureStream
from .spec import MixtureSpec


def rank_shards(n_shards: int, rank: int, world: int) -> range:
    """The shards rank ``rank`` of ``world`` reads: a contiguous block of ``n_shards / world``."""
    if n_shards < 1 or n_shards % world:
        raise MixtureError(f"the number of data shards ({n_shards}) must be a positive multiple of the "
                           f"number of data-parallel ranks ({world})")
    k = n_shards // world
    return range(rank * k, (rank + 1) * k)


class ShardedStream:
    """Shards ``shards`` of ``n_shards`` of a mixture, read as one stream (see the module docstring).
    Keyword arguments are :class:`PackedMixtureStream`'s."""

    def __init__(self, spec: MixtureSpec, tokenizer, seq_len: int, seed: int = 0, stage: str | None = None,
                 *, shards: range, n_shards: int, **kwargs):
        if not len(shards) or shards[0] < 0 or shards[-1] >= n_shards:
            raise MixtureError(f"shards {shards!r} must be a non-empty part of range({n_shards})")
        self.n_shards = n_shards
        self.streams = [PackedMixtureStream(spec, tokenizer, seq_len, seed, stage, shard=(i, n_shards), **kwargs)
                        for i in shards]

    @property
    def spec(self) -> MixtureSpec:
        return self.streams[0].spec

    @property
    def stage(self) -> str:
        return self.streams[0].stage

    def set_stage(self, stage: str) -> None:
        for s in self.streams:
            s.set_stage(stage)

    def next_batch(self, n_seqs: int) -> dict:
        """``n_seqs`` rows: ``n_seqs / k`` from each of this rank's ``k`` shards, in shard order."""
        k = len(self.streams)
        if n_seqs % k:
            raise MixtureError(f"next_batch: {n_seqs} rows cannot be split evenly over this rank's {k} data "
                               f"shards; ask for a multiple of {k}")
        parts = [s.next_batch(n_seqs // k) for s in self.streams]
        return parts[0] if k == 1 else {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def heldout_batches(self, source_name: str, n_seqs: int, seq_len: int | None = None) -> dict:
        """Held-out rows do not depend on the shard: every rank evaluates the same documents."""
        return self.streams[0].heldout_batches(source_name, n_seqs, seq_len)

    # ------------------------------------------------------------------ accounting
    def shard_accounting(self) -> list[dict]:
        """This rank's shards' accounting dicts; :meth:`merge_accounting` sums every rank's."""
        return [s.accounting() for s in self.streams]

    def merge_accounting(self, parts: list[dict]) -> dict:
        """The accounting of all shards together: tokens and documents summed; epochs = documents /
        the source's training documents (for streaming sources of unknown size: the shards' mean)."""
        out = {}
        for i, src in enumerate(self.streams[0].sources):
            name = src.spec.name
            tokens = sum(p[name]["tokens"] for p in parts)
            docs = sum(p[name]["documents"] for p in parts)
            epochs = (docs / src.n_train if not src.streaming and src.n_train
                      else sum(p[name]["epochs"] for p in parts) / len(parts))
            stage_tokens: dict[str, int] = {}
            for p in parts:
                for st, n in p[name].get("stage_tokens", {}).items():
                    stage_tokens[st] = stage_tokens.get(st, 0) + n
            out[name] = {"tokens": tokens, "documents": docs, "epochs": epochs, "stage_tokens": stage_tokens}
            skipped = sum(p[name].get("skipped_records", 0) for p in parts)
            if skipped:
                out[name]["skipped_records"] = skipped
        return out

    def accounting(self) -> dict:
        """The accounting of this rank's shards."""
        return self.merge_accounting(self.shard_accounting())

    def format_accounting(self, acc: dict | None = None) -> str:
        return format_accounting(self.accounting() if acc is None else acc, stage_shares(self.streams[0].spec))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> list[dict]:
        """One state per shard of this rank (each names its shard); concatenate every rank's list
        for a checkpoint that any rank count dividing ``n_shards`` can resume from."""
        return [s.state_dict() for s in self.streams]

    def load_state_dict(self, states: list[dict] | dict) -> None:
        """Restore this rank's shards from the states of all shards (a single dict: a state saved
        before data shards existed, i.e. the whole mixture)."""
        if isinstance(states, dict):
            states = [states]
        by_shard = {tuple(st.get("shard", (0, 1))): st for st in states}
        counts = {n for _, n in by_shard}
        if counts != {self.n_shards} or len(by_shard) != self.n_shards:
            saved = counts.pop() if len(counts) == 1 else sorted(counts)
            raise MixtureError(f"the saved data state has {saved} data shards ({len(by_shard)} states) but this "
                               f"stream reads {self.n_shards}; resume with {saved} data shards (any number of "
                               f"ranks that divides it)")
        for s in self.streams:
            s.load_state_dict(by_shard[s.shard])

    # ------------------------------------------------------------------ cleanup
    def close(self) -> None:
        for s in self.streams:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
