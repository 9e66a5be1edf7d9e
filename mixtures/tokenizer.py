"""Train a small byte-level BPE tokenizer on a mixture's training text (for the tiny demo model).

Real checkpoints bring their own tokenizer; this one exists so the demo checkpoint has a
tokenizer that fits the bundled data. Held-out documents are not used for training it.
"""
from __future__ import annotations

from .errors import MixtureError
from .sources import load_sources
from .spec import MixtureSpec

EOS_TOKEN = "<|endoftext|>"


def build_tokenizer_from_corpus(spec: MixtureSpec, vocab_size: int = 4096, *,
                                min_frequency: int = 2, eos_token: str = EOS_TOKEN):
    """Train a byte-level BPE (``tokenizers``) on every source's training documents, in spec
    order (streaming sources: their first 100k training documents), and wrap it as a
    ``transformers.PreTrainedTokenizerFast``.

    ``eos_token`` (also used as ``pad_token``) is the only special token; there is no BOS.
    Deterministic: the same spec and vocab size give the same vocabulary and merges every run
    (the trainer counts words then picks merges by (count, pair) order; tested).
    Save it with ``tok.save_pretrained(folder)``; reload with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise MixtureError(f"vocab_size must be at least 258 (256 bytes + {eos_token}), got {vocab_size}")
    sources = load_sources(spec)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        for s in sources:
            yield from s.train_texts()

    length = None if any(s.streaming for s in sources) else sum(s.n_train for s in sources)
    tok.train_from_iterator(texts(), trainer=trainer, length=length)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=eos_token,
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)
