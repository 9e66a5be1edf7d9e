"""Tokenized training documents by ``(source, epoch, pos)`` for the mixture stream: the
synchronous reference path (:class:`Fetcher`) and background tokenization in worker processes
(:class:`BackgroundFetcher`), which yields the same documents.

A fetcher serves one data shard ``(index, count)``: in every epoch, shard ``i`` of ``n`` owns the
documents at positions ``i, i+n, i+2n, ...`` of the epoch's permutation (or, for streaming sources,
of the epoch's read order), so ``pos`` counts this shard's documents only and only they are
tokenized. Shard ``(0, 1)`` is the whole source."""
from __future__ import annotations

import collections
import itertools
import zlib

import numpy as np

from ._tokenize import make_encoder, make_payload, worker_encode_docs, worker_init
from .sources import SourceData


class Fetcher:
    """Tokenized training documents by ``(source, epoch, pos)``; synchronous reference path.

    Tokenizes ``block`` consecutive documents of a source at a time (the fast tokenizer's
    batch encode), caching the current block of each source.
    """

    def __init__(self, sources: list[SourceData], encode, seed: int, block: int = 32,
                 shard: tuple[int, int] = (0, 1)):
        self.sources = sources
        self.encode = encode
        self.seed = seed
        self.block = block
        self.shard = shard
        self._perm: dict[int, tuple[int, np.ndarray]] = {}
        self._cache: dict[int, tuple[int, int, list]] = {}   # s -> (epoch, start, docs)
        self._readers: dict[int, list] = {}                  # streaming sources

    def perm(self, s: int, epoch: int) -> np.ndarray:
        got = self._perm.get(s)
        if got is None or got[0] != epoch:
            src = self.sources[s]
            rng = np.random.default_rng([self.seed, zlib.crc32(src.spec.name.encode()), epoch])
            i, n = self.shard
            got = (epoch, src.train_idx[rng.permutation(len(src.train_idx))][i::n])
            self._perm[s] = got
        return got[1]

    def n_train(self, s: int) -> int | None:
        """Training documents per epoch in this shard (None: a streaming source not yet read to its end)."""
        src = self.sources[s]
        if src.streaming:
            return src.n_train
        i, n = self.shard
        return len(range(i, src.n_train, n))

    def _texts(self, s: int, epoch: int, start: int, stop: int) -> list[str]:
        return self.sources[s].texts(self.perm(s, epoch)[start:stop])

    def get(self, s: int, epoch: int, pos: int) -> np.ndarray | None:
        """Document ``pos`` of ``epoch`` (tokens + EOS), or None past the end of the epoch."""
        src = self.sources[s]
        if src.streaming:
            return self._get_streaming(s, epoch, pos)
        n_train = self.n_train(s)
        if pos >= n_train:
            return None
        c = self._cache.get(s)
        if c is not None and c[0] == epoch and c[1] <= pos < c[1] + len(c[2]):
            return c[2][pos - c[1]]
        stop = min(pos + self.block, n_train)
        docs = self.encode(self._texts(s, epoch, pos, stop))
        self._cache[s] = (epoch, pos, docs)
        return docs[0]

    def _get_streaming(self, s: int, epoch: int, pos: int) -> np.ndarray | None:
        # reader: [epoch, next position, iterator, lookahead texts]
        r = self._readers.get(s)
        if r is None or r[0] != epoch or r[1] > pos:
            i, n = self.shard
            it = itertools.islice(self.sources[s].iter_epoch(self.seed, epoch), i, None, n)
            r = [epoch, 0, it, collections.deque()]
            self._readers[s] = r
        while r[1] < pos:                      # skip to pos (resume): read, do not tokenize
            if r[3]:
                r[3].popleft()
            elif next(r[2], None) is None:
                return None
            r[1] += 1
        if not r[3]:                           # read and tokenize a block of documents
            texts = [t for _, t in zip(range(self.block), r[2])]
            r[3].extend(self.encode(texts) if texts else [])
        if not r[3]:
            if self.sources[s].n_train is None:
                self.sources[s].n_train = pos
            return None
        r[1] += 1
        return r[3].popleft()

    def close(self) -> None:
        pass


class BackgroundFetcher(Fetcher):
    """Same documents as :class:`Fetcher`, tokenized ahead in worker processes.

    Per source, blocks ``[b*block, (b+1)*block)`` of an epoch are submitted to a process pool
    ``depth`` blocks ahead of the one being read (continuing into the next epoch for
    ``repeat`` sources). Only document indices go to the workers: each worker loads the
    mixture's sources itself (once, from the `datasets` cache) and renders and tokenizes there,
    so this process does nothing but sample and pack.
    """

    def __init__(self, sources, tokenizer, seed, block, num_workers: int, depth: int, spec,
                 shard: tuple[int, int] = (0, 1)):
        super().__init__(sources, None, seed, block, shard)
        import multiprocessing as mp
        import pickle
        from concurrent.futures import ProcessPoolExecutor
        self.depth = depth
        self.pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=mp.get_context("spawn"),
                                        initializer=worker_init,
                                        initargs=(make_payload(tokenizer), pickle.dumps(spec)))
        self.queues: dict[int, collections.deque] = {}
        self.stoppers = {i: s.spec.on_exhausted == "stop" for i, s in enumerate(sources)}
        self.encode = make_encoder(tokenizer)     # for streaming sources

    def _next_block(self, s: int, epoch: int, b: int):
        n = self.n_train(s)
        if (b + 1) * self.block < n:
            return epoch, b + 1
        return (None if self.stoppers[s] else (epoch + 1, 0))

    def _submit(self, s: int, epoch: int, b: int):
        n = self.n_train(s)
        start, stop = b * self.block, min((b + 1) * self.block, n)
        fut = self.pool.submit(worker_encode_docs, s, self.perm(s, epoch)[start:stop])
        return (epoch, b, fut)

    def get(self, s: int, epoch: int, pos: int) -> np.ndarray | None:
        src = self.sources[s]
        if src.streaming:          # read in order here; tokenized in this process
            return self._get_streaming(s, epoch, pos)
        if pos >= self.n_train(s):
            return None
        b = pos // self.block
        q = self.queues.setdefault(s, collections.deque())
        while q and (q[0][0], q[0][1]) != (epoch, b):
            e0, b0, f0 = q.popleft()
            if (e0, b0) > (epoch, b):   # not in this queue's future: restart it
                f0.cancel()
                for _, _, f in q:
                    f.cancel()
                q.clear()
        if not q:
            q.append(self._submit(s, epoch, b))
        # keep `depth` blocks in flight behind the front
        while len(q) < self.depth:
            nxt = self._next_block(s, q[-1][0], q[-1][1])
            if nxt is None:
                break
            q.append(self._submit(s, *nxt))
        docs = q[0][2].result()
        return docs[pos - b * self.block]

    def close(self) -> None:
        if self.pool is not None:
            for q in self.queues.values():
                for _, _, f in q:
                    f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
