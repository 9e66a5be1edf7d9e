"""Packing tokenized documents into rows, and the position ids that keep document boundaries.

- **Rows**: each document's tokens, then the tokenizer's EOS, are appended to one token stream;
  row ``k`` is ``stream[k*L : k*L + L + 1]`` (``L = seq_len``): consecutive rows share one
  token, so every token is a label exactly once and nothing is dropped or padded. A document may
  span two or more rows.
- **Positions**: ``position_ids`` restart at 0 at every document start (the token after an EOS)
  and at the start of every row. The model (``anneal.model``) uses them for RoPE, and, when its
  document mask is on, to confine attention to each document (a block mask from the position
  resets); off (the default), its attention is plain causal over the whole packed row, so a
  token attends to earlier documents of its row (separated from it by EOS). Positions stay below
  ``L+1`` (never the untrained absolute positions a long document would reach), and RoPE's
  relative positions inside a document are exact. ``source_ids`` give the source of every
  token, for per-source loss.

Which document comes next is the stream's business (:mod:`mixtures.stream`); this module only
turns documents into rows, so that training and held-out batches are packed by the same code.
"""
from __future__ import annotations

import collections

import numpy as np
import torch


class PackingBuffer:
    """Documents drawn but not yet fully returned, in stream order.

    Each entry is ``[source, epoch, pos, ids, offset]``: ``offset`` tokens of ``ids`` were
    returned already. The resume state keeps only ``(source, epoch, pos, offset)``; the ids are
    tokenized again on load.
    """

    def __init__(self):
        self.entries: collections.deque = collections.deque()
        self.tokens = 0                  # tokens not yet returned

    def push(self, source: int, epoch: int, pos: int, ids: np.ndarray, offset: int = 0) -> None:
        self.entries.append([source, epoch, pos, ids, offset])
        self.tokens += len(ids) - offset

    def take(self, n_rows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next ``n_rows * seq_len + 1`` tokens (the caller has pushed enough): token ids,
        source ids, and whether each token starts a document. Consumes all but the last token,
        which the next row starts with."""
        need = n_rows * seq_len + 1
        ids = np.empty(need, dtype=np.int64)
        src = np.empty(need, dtype=np.int64)
        docstart = np.zeros(need, dtype=bool)
        at = 0
        for s, _e, _p, d, off in self.entries:
            k = min(len(d) - off, need - at)
            ids[at:at + k] = d[off:off + k]
            src[at:at + k] = s
            docstart[at] = off == 0
            at += k
            if at == need:
                break
        drop = n_rows * seq_len
        while drop:
            entry = self.entries[0]
            left = len(entry[3]) - entry[4]
            if left <= drop:
                self.entries.popleft()
                drop -= left
                self.tokens -= left
            else:
                entry[4] += drop
                self.tokens -= drop
                drop = 0
        return ids, src, docstart

    def positions(self) -> list[list[int]]:
        """``[source, epoch, pos, offset]`` of every entry: the buffer's part of the resume state."""
        return [[int(s), int(e), int(p), int(off)] for s, e, p, _d, off in self.entries]


def empty_rows(seq_len: int) -> dict:
    empty = torch.zeros((0, seq_len + 1), dtype=torch.long)
    return {"input_ids": empty, "position_ids": empty.clone(), "source_ids": empty.clone()}


def pack_rows(ids: np.ndarray, src: np.ndarray, docstart: np.ndarray, seq_len: int) -> dict:
    """A span of ``n * seq_len + 1`` tokens as ``n`` rows of ``seq_len + 1`` sharing one token
    each: ``input_ids``, ``position_ids`` and ``source_ids`` LongTensors ``[n, seq_len + 1]``."""
    L = seq_len
    rows = lambda a: np.lib.stride_tricks.sliding_window_view(a, L + 1)[::L]  # noqa: E731
    starts = rows(docstart).copy()
    starts[:, 0] = True
    idx = np.broadcast_to(np.arange(L + 1), starts.shape)
    pos = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return {
        "input_ids": torch.from_numpy(np.array(rows(ids), copy=True)),
        "position_ids": torch.from_numpy(np.array(pos, copy=True)),
        "source_ids": torch.from_numpy(np.array(rows(src), copy=True)),
    }


def pack_documents(docs: list[np.ndarray], source: int, n_rows: int, seq_len: int) -> dict:
    """The first ``n_rows`` rows of ``docs`` (one source's documents, in order), packed like
    training rows; the documents must hold at least ``n_rows * seq_len + 1`` tokens."""
    need = n_rows * seq_len + 1
    ids = np.concatenate(docs).astype(np.int64)
    docstart = np.zeros(len(ids), dtype=bool)
    docstart[np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
    return pack_rows(ids[:need], np.full(need, source, dtype=np.int64), docstart[:need], seq_len)
