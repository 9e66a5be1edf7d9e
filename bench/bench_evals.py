"""Cost of the in-loop benchmark evals at dots1 width (the bench_step.py slice: hidden 4096, 32
heads, dots1's MoE layer shape, random weights): seconds per 1,000 multiple-choice items and per
1,000 generative items' gold-answer likelihood, forward only in bf16, as `anneal.evals.scoring`
runs them in the loop. Items are the bundled GSM8K items (5-shot prompts, gold solutions) and a
4-choice MC task built from them, tokenized with the shipped tiny tokenizer (token counts of the
dots1 tokenizer differ; the script prints tokens per item so the number can be rescaled).

    python bench/bench_evals.py --items 200 [--batch-tokens 16384] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from anneal.evals.scoring import build_requests, loglikelihoods, rank_items
    from anneal.evals.tasks import load_task
    from anneal.model.config import Dots1Config
    from anneal.model.dots1 import Dots1ForCausalLM
    from bench_step import slice_arch
    from test_evals import mc_task

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--moe-layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = Dots1Config.from_hf_dict(slice_arch(args), source="bench slice")
    model = Dots1ForCausalLM(cfg, "grouped_mm")
    model.init_weights(seed=0)
    model.to(device).to_dtype(torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(str(REPO / "anneal" / "assets" / "tiny-stable"))
    n = min(args.items, 92)  # the bundled GSM8K items: 100 = n + 5 shots + 3 distractor sources
    tasks = {"generative": load_task("gsm8k", limit=n),
             "multiple_choice": load_task(str(mc_task(Path(tempfile.mkdtemp()), n=n, shots=5)))}
    out = {"items": n, "batch_tokens": args.batch_tokens, "layers": cfg.num_hidden_layers}
    for kind, task in tasks.items():
        reqs = build_requests([task], tok, rank_items([task], 0, 1))
        loglikelihoods(model, reqs[:8], device, args.seq, args.batch_tokens)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loglikelihoods(model, reqs, device, args.seq, args.batch_tokens)
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        tokens = sum(len(r.context) + len(r.continuation) for r in reqs)
        out[kind] = {"s_per_1000_items": 1000 * s / n, "tokens_per_item": tokens / n,
                     "tokens_per_s": tokens / s, "layers": cfg.num_hidden_layers}
        print(f"{kind}: {1000 * s / n:.1f} s per 1,000 items ({tokens / n:.0f} tokens/item, "
              f"{tokens / s:,.0f} tokens/s, {cfg.num_hidden_layers} layers)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
