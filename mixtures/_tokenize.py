"""Tokenizing documents; also the code that runs inside background worker processes.

Kept free of torch/transformers imports so that spawned workers start fast.
"""
from __future__ import annotations

import pickle

import numpy as np

_WORKER_ENCODE = None


def make_payload(tokenizer) -> bytes:
    """What a worker needs to rebuild an equivalent encoder: the backend tokenizer's JSON for
    ``tokenizers``-based tokenizers (fast, small), else the pickled tokenizer object."""
    eos = tokenizer.eos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return pickle.dumps(("json", backend.to_str(), eos))
    return pickle.dumps(("pickle", tokenizer, eos))


def encoder_from_payload(payload: bytes):
    kind, obj, eos = pickle.loads(payload)
    if kind == "json":
        from tokenizers import Tokenizer
        return make_encoder_backend(Tokenizer.from_str(obj), eos)
    return make_encoder(obj)


def make_encoder_backend(backend, eos_id: int):
    def encode(texts):
        encs = backend.encode_batch(list(texts), add_special_tokens=False)
        return [_with_eos(e.ids, eos_id) for e in encs]
    return encode


def make_encoder(tokenizer):
    """texts -> list of int32 arrays, each document's tokens followed by EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        from .errors import MixtureError
        raise MixtureError("the tokenizer has no eos_token; documents are separated by EOS, so set "
                           "one (e.g. tokenizer.eos_token = '<|endoftext|>')")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return make_encoder_backend(backend, eos)

    def encode(texts):
        out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [_with_eos(ids, eos) for ids in out]
    return encode


def _with_eos(ids, eos: int) -> np.ndarray:
    a = np.empty(len(ids) + 1, dtype=np.int32)
    a[:-1] = ids
    a[-1] = eos
    return a


_WORKER_SOURCES = None


def worker_init(payload: bytes, spec_payload: bytes | None = None) -> None:
    """Runs once in each worker: rebuild the encoder and, if given the mixture spec, load its
    sources (from the `datasets` cache: memory-mapped Arrow, so cheap) to render texts here.
    Preemption signals (SIGTERM, SIGUSR1) are the trainer's to handle: a scheduler that signals
    the whole process group must not kill the worker the trainer still reads its last step from."""
    global _WORKER_ENCODE, _WORKER_SOURCES
    import signal

    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    _WORKER_ENCODE = encoder_from_payload(payload)
    if spec_payload is not None:
        import logging
        import warnings
        logging.getLogger("mixtures").setLevel(logging.ERROR)   # the main process already warned
        warnings.simplefilter("ignore")
        from .sources import load_sources
        _WORKER_SOURCES = load_sources(pickle.loads(spec_payload))


def worker_encode_docs(s: int, idx) -> list[np.ndarray]:
    """Render documents ``idx`` of source ``s`` and tokenize them (+ EOS)."""
    return _WORKER_ENCODE(_WORKER_SOURCES[s].texts(idx))
