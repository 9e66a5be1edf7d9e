"""The packed, weighted, deterministic and resumable mixture stream.

The stream puts the parts together and owns what ties them: each source's cursor and epochs,
the current stage, the resume state and the held-out rows. Choosing the source, packing rows
and counting tokens each live in their own module (2-4 below).

How a batch is made
-------------------
1. **Document order inside a source**: the training documents of source ``s`` are visited in
   a seeded permutation per epoch, ``rng([seed, crc32(name), epoch]).permutation(n_train)``.
   A source's cursor is ``(epoch, pos)``. At the end of an epoch, ``on_exhausted: repeat``
   starts epoch+1 with a new permutation (logged); ``stop`` drops the source, and the other
   sources of the stage share its weight in proportion to theirs (logged and warned).
2. **Which source next** (:mod:`mixtures.sampler`): the source furthest behind its share of
   the stage's tokens gives its next whole document, so every source stays within one document
   of its share. The state is one integer per source.
3. **Packing** (:mod:`mixtures.packing`): documents, each followed by EOS, are cut into rows of
   ``seq_len + 1`` tokens that share one token with the next row (nothing dropped or padded);
   ``position_ids`` restart at every document start and at every row start; ``source_ids``
   give the source of every token.
4. **Accounting** (:mod:`mixtures.accounting`): what the returned rows held, per source and
   stage.

Data shards
-----------
``shard=(i, n)`` makes the stream one of ``n`` disjoint streams of the same mixture, for data
parallelism: in every epoch of every source, shard ``i`` owns the documents at positions
``i, i+n, i+2n, ...`` of the epoch's order, and it samples, tokenizes and packs only those (its
own sampler, packing buffer and cursors), so ``n`` ranks share the tokenization work instead of
each tokenizing everything. ``(0, 1)``, the default, is the whole mixture. The shares and
guarantees above hold per shard. :class:`mixtures.shards.ShardedStream` combines shards into
one batch.

Resume
------
:meth:`PackedMixtureStream.state_dict` is small and JSON-able: the stage, per-source cursors
and stage token counters, the accounting counters, and the partly-consumed documents still
in the packing buffer as ``(source, epoch, pos, offset)`` (they are re-tokenized on load;
tokenization is deterministic). A stream loaded from it yields exactly the batches the
uninterrupted stream would have yielded.

Background tokenization (``num_workers > 0``) only changes *where* documents are tokenized:
documents of each source are rendered and tokenized ahead, in blocks, in spawned worker
processes (streaming sources: read here, tokenized here); the
order of documents in a source does not depend on the sampler, so the batches are identical
to the synchronous path (which stays the reference; tested).
"""
from __future__ import annotations

import logging
import warnings

from ._tokenize import make_encoder
from .accounting import TokenAccounting, format_accounting, stage_shares
from .errors import MixtureError, MixtureExhausted
from .fetch import BackgroundFetcher, Fetcher
from .packing import PackingBuffer, empty_rows, pack_documents, pack_rows
from .sampler import TokenFairSampler
from .sources import MixtureWarning, load_sources
from .spec import MixtureSpec

log = logging.getLogger("mixtures")

STATE_VERSION = 1


class PackedMixtureStream:
    """Batches of packed token sequences from a mixture (see module docstring).

    Args:
        spec: the mixture (:func:`mixtures.load_mixture`).
        tokenizer: a ``transformers`` tokenizer with ``eos_token`` set (a
            ``PreTrainedTokenizerFast`` is encoded through its Rust backend directly).
        seq_len: tokens per sequence fed to the model; rows have ``seq_len + 1`` tokens.
        seed: training data seed (per-epoch document order). Held-out documents do not depend on it.
        stage: initial stage (default: the mixture's first stage).
        num_workers: 0 = tokenize in this process (reference path); >0 = background worker
            processes (same batches). Workers are *spawned*: a script that creates such a
            stream at import time needs the usual ``if __name__ == "__main__":`` guard.
            Call :meth:`close` (or use ``with``) to stop them.
        block_docs: documents tokenized together per source (default 32, or 8 with workers).
        prefetch_blocks: blocks per source kept in flight with ``num_workers > 0``.
        shard: ``(index, count)``: this stream is data shard ``index`` of ``count`` (see the
            module docstring); ``(0, 1)`` is the whole mixture.
    """

    def __init__(self, spec: MixtureSpec, tokenizer, seq_len: int, seed: int = 0,
                 stage: str | None = None, *, num_workers: int = 0, block_docs: int | None = None,
                 prefetch_blocks: int = 32, shard: tuple[int, int] = (0, 1)):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise MixtureError(f"seq_len must be a positive integer, got {seq_len!r}")
        shard = tuple(shard)
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise MixtureError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
        self.shard = shard
        self.spec = spec
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = int(seed)
        self.sources = load_sources(spec)
        self.encode = make_encoder(tokenizer)
        n = len(self.sources)
        if block_docs is None:
            block_docs = 8 if num_workers > 0 else 32
        if num_workers > 0:
            self._fetcher: Fetcher = BackgroundFetcher(self.sources, tokenizer, self.seed, block_docs,
                                                         num_workers, max(1, prefetch_blocks), spec, shard)
        else:
            self._fetcher = Fetcher(self.sources, self.encode, self.seed, block_docs, shard)
        self.num_workers = num_workers
        self.sampler = TokenFairSampler(n)
        self._cursor = [[0, 0] for _ in range(n)]     # next document: [epoch, pos]
        self._dropped = [False] * n
        self._packing = PackingBuffer()
        self._counts = TokenAccounting(n)
        self._heldout_cache: dict = {}
        self.stage = None
        self.set_stage(stage if stage is not None else self._first_stage())

    def _first_stage(self) -> str:
        if not self.spec.stage_names:
            return "default"
        return self.spec.stage_names[0]

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage: str) -> None:
        """Switch the weights to ``stage`` (at a schedule boundary). Source cursors, the
        packing buffer and the accounting are kept; the sampler's per-stage counters restart
        so the new stage's proportions hold from its first token."""
        if stage == self.stage:
            return
        self._weights = self.spec.weights(stage)   # validates (unknown / all-zero)
        self.stage = stage
        self.sampler.reset()
        log.info("mixture %s: stage %s, weights %s", self.spec.name, stage,
                 dict(zip(self.spec.source_names, self.spec.normalized_weights(stage))))

    # ------------------------------------------------------------------ pulling documents
    def _pull_doc(self) -> None:
        active = [not d for d in self._dropped]
        while True:
            s = self.sampler.choose(self._weights, active)
            if s < 0:
                raise MixtureExhausted(
                    f"{self.spec.path}: every source with a weight in stage {self.stage!r} is "
                    f"exhausted (on_exhausted: stop); use `on_exhausted: repeat`, add data, or end "
                    f"the stage earlier. Accounting: {self.accounting()}")
            epoch, pos = self._cursor[s]
            ids = self._fetcher.get(s, epoch, pos)
            if ids is not None:
                break
            self._end_of_epoch(s, epoch, pos)
            active[s] = not self._dropped[s]
        self.sampler.add(s, len(ids))
        self._packing.push(s, epoch, pos, ids)
        self._cursor[s][1] += 1

    def _end_of_epoch(self, s: int, epoch: int, n: int) -> None:
        src = self.sources[s]
        name = src.spec.name
        if n == 0:
            of_shard = (f" for data shard {self.shard[0]} of {self.shard[1]} (fewer documents than "
                        f"shards: use fewer data shards or add data)" if self.shard[1] > 1 else "; check its data")
            raise MixtureError(f"{self.spec.path}: source {name!r} has no training documents in "
                               f"epoch {epoch}{of_shard}")
        if src.spec.on_exhausted == "repeat":
            self._cursor[s] = [epoch + 1, 0]
            log.info("mixture %s: source %s finished epoch %d (%d documents), starting epoch %d "
                     "(new shuffle)", self.spec.name, name, epoch, n, epoch + 1)
        else:
            self._dropped[s] = True
            msg = (f"mixture {self.spec.name}: source {name!r} is exhausted after {n} documents "
                   f"(on_exhausted: stop); dropped, the other sources' weights are renormalized")
            log.warning(msg)
            warnings.warn(msg, MixtureWarning, stacklevel=5)

    # ------------------------------------------------------------------ batches
    def next_batch(self, n_seqs: int) -> dict:
        """``n_seqs`` packed rows: ``input_ids``, ``position_ids``, ``source_ids``, each a
        LongTensor ``[n_seqs, seq_len + 1]`` (inputs ``[:, :-1]``, labels ``[:, 1:]``)."""
        L = self.seq_len
        if isinstance(n_seqs, bool) or not isinstance(n_seqs, int) or n_seqs < 0:
            raise MixtureError(f"next_batch: n_seqs must be an integer >= 0, got {n_seqs!r}")
        if n_seqs == 0:
            return empty_rows(L)
        while self._packing.tokens < n_seqs * L + 1:
            self._pull_doc()
        ids, src, docstart = self._packing.take(n_seqs, L)
        self._counts.count(src, docstart, self.stage, n_seqs)
        return pack_rows(ids, src, docstart, L)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.next_batch(1)

    # ------------------------------------------------------------------ accounting
    def accounting(self) -> dict:
        """Per source, exactly what has gone into the batches returned so far: ``tokens``
        (EOS included), ``documents`` (documents whose first token was returned) and
        ``epochs`` (documents / training documents of the source, a float: 2.5 = two full
        passes and half of a third) and ``stage_tokens`` (tokens per stage)."""
        out = {}
        for i, src in enumerate(self.sources):
            n = self._fetcher.n_train(i)
            docs = self._counts.documents[i]
            out[src.spec.name] = {
                "tokens": self._counts.tokens[i],
                "documents": docs,
                # streaming sources of unknown size: completed passes so far (an int)
                "epochs": docs / n if n else self._cursor[i][0],
                "stage_tokens": {st: t[i] for st, t in self._counts.stage_tokens.items()},
            }
            if src.skipped:
                out[src.spec.name]["skipped_records"] = src.skipped
        return out

    def format_accounting(self) -> str:
        """A small table of :meth:`accounting` for the console/log."""
        return format_accounting(self.accounting(), stage_shares(self.spec))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """JSON-able state; see the module docstring."""
        return {
            "version": STATE_VERSION,
            "mixture": self.spec.name,
            "source_names": list(self.spec.source_names),
            "n_train": [None if s.streaming else s.n_train for s in self.sources],
            "stream_n_train": [s.n_train if s.streaming else None for s in self.sources],
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shard": list(self.shard),
            "stage": self.stage,
            "cursors": [list(c) for c in self._cursor],
            "dropped": list(self._dropped),
            "stage_tokens": list(self.sampler.tokens),
            "buffer": self._packing.positions(),
            **self._counts.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` output. The spec (sources, document counts), seed and
        seq_len must be the same; the error says which one differs."""
        where = f"mixture {self.spec.name}: load_state_dict"
        if sd.get("version") != STATE_VERSION:
            raise MixtureError(f"{where}: state version {sd.get('version')!r}, expected {STATE_VERSION}")
        for key, mine in (("source_names", list(self.spec.source_names)),
                          ("n_train", [None if s.streaming else s.n_train for s in self.sources]),
                          ("seed", self.seed), ("seq_len", self.seq_len), ("shard", list(self.shard))):
            saved = sd.get(key, [0, 1] if key == "shard" else None)   # states before shards: the whole mixture
            if saved != mine:
                raise MixtureError(f"{where}: the saved {key} {saved!r} differs from this stream's "
                                   f"{mine!r}; resume with the same mixture, data, seed, seq_len and data shards")
        for src, n in zip(self.sources, sd.get("stream_n_train", [])):
            if src.streaming and n is not None:
                src.n_train = n
        self._weights = self.spec.weights(sd["stage"])
        self.stage = sd["stage"]
        self._cursor = [list(map(int, c)) for c in sd["cursors"]]
        self._dropped = [bool(x) for x in sd["dropped"]]
        self.sampler.tokens = [int(x) for x in sd["stage_tokens"]]
        self._packing = PackingBuffer()
        for s, e, p, off in sd["buffer"]:
            d = self._fetcher.get(s, e, p)
            if d is None:
                raise MixtureError(f"{where}: document {p} of epoch {e} of source "
                                   f"{self.spec.source_names[s]!r} is gone; did its data change?")
            self._packing.push(s, e, p, d, off)
        self._counts.load_state_dict(sd)

    # ------------------------------------------------------------------ held-out
    def heldout_batches(self, source_name: str, n_seqs: int, seq_len: int | None = None) -> dict:
        """Fixed packed sequences from ``source_name``'s held-out documents (never used for
        training; chosen by the mixture's ``heldout_seed``, independent of the training seed),
        in document order, packed like training batches. Returns fewer than ``n_seqs`` rows,
        possibly 0 (with a warning), if the held-out documents are too short to fill them or
        the source has ``heldout_docs: 0``."""
        L = self.seq_len if seq_len is None else seq_len
        key = (source_name, n_seqs, L)
        if key in self._heldout_cache:
            return {k: v.clone() for k, v in self._heldout_cache[key].items()}
        i = self.spec.source_index(source_name)
        src = self.sources[i]
        texts = src.heldout_texts()
        docs = self.encode(texts) if texts else []
        n_tok = sum(len(d) for d in docs)
        rows = min(n_seqs, max(0, (n_tok - 1) // L))
        if rows < n_seqs:
            why = ("has heldout_docs: 0" if not docs else
                   f"has {len(docs)} held-out documents, {n_tok} tokens: {rows} of {n_seqs} "
                   f"sequences of {L + 1}")
            warnings.warn(f"{self.spec.path}: source {source_name!r} {why}; raise its heldout_docs "
                          f"for more held-out evaluation", MixtureWarning, stacklevel=2)
        if rows == 0:
            return empty_rows(L)
        out = self._heldout_cache[key] = pack_documents(docs, i, rows, L)
        return {k: v.clone() for k, v in out.items()}

    # ------------------------------------------------------------------ cleanup
    def close(self) -> None:
        """Stop background workers (no-op for the synchronous path)."""
        self._fetcher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
