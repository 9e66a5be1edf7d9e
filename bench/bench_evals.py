"""Cost of the in-loop benchmark evals at dots1 width (the bench_step.py slice: hidden 4096, 32
heads, dots1's MoE layer shape, random weights): seconds per 1,000 multiple-choice items and per
1,000 generative items' gold-answer likelihood, forward only in bf16, as `anneal.evals.scoring`
runs them in the loop. Items are the bundled GSM8K items (5-shot prompts, gold solutions) and a
4-choice MC task built from them, tokenized with the shipped tiny tokenizer (token counts of the
dots1 tokenizer differ; the script prints tokens per item so the number can be rescaled).

    python bench/bench_evals.py --items 200 [--batch-tokens 16384] [--json out.json]

`--harness`: instead, lm-evaluation-harness's GSM8K generation on the same slice (bf16, real vocab)
written as an HF export with the tiny tokenizer: `anneal.evals.harness.evaluate_export` with the hf
backend, greedy decoding up to the task's `max_gen_toks`. Reported: wall seconds (model load
included) and seconds in `generate` per 1,000 items, decode steps, generated tokens (batch rows x
decode steps: a random model never emits a stop string, so each item runs to `max_gen_toks`).
On the GPU machine (and a tiny CPU check):

    python bench/bench_evals.py --harness --harness-items 64 --harness-batch 16 --json out.json
    python bench/bench_evals.py --harness --hidden 256 --vocab 4096 --moe-layers 1 --harness-items 4
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


def harness(args, model) -> dict:
    """lm-evaluation-harness GSM8K (hf backend) on `model` exported with the tiny tokenizer."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from anneal.checkpoints.hf_export import export_hf_checkpoint
    from anneal.evals.harness import evaluate_export
    from anneal.evals.tasks import load_task

    cuda = torch.cuda.is_available()
    n = len(load_task("gsm8k", limit=args.harness_items).items)
    max_gen = load_task("gsm8k").harness["generation_kwargs"]["max_gen_toks"]
    stats = {"generate_s": 0.0, "decode_steps": 0, "generated_tokens": 0}
    generate = HFLM._model_generate

    def counted(self, context, *a, **k):  # time and count every batch's generate call
        t0 = time.perf_counter()
        out = generate(self, context, *a, **k)
        if cuda:
            torch.cuda.synchronize()
        stats["generate_s"] += time.perf_counter() - t0
        stats["decode_steps"] += out.shape[1] - context.shape[1]
        stats["generated_tokens"] += (out.shape[1] - context.shape[1]) * out.shape[0]
        return out

    HFLM._model_generate = counted
    with tempfile.TemporaryDirectory(prefix="bench-evals-") as tmp:
        export = export_hf_checkpoint(model, Path(tmp) / "hf", tokenizer_dir=REPO / "anneal" / "assets" / "tiny-stable")
        t0 = time.perf_counter()
        res = evaluate_export(export, ["gsm8k"], backend="hf", limit=n, device="cuda" if cuda else "cpu",
                              dtype="bfloat16", batch_size=args.harness_batch)
        wall = time.perf_counter() - t0
    out = {"items": n, "batch_size": args.harness_batch, "max_gen_toks": max_gen, "wall_s": wall,
           "s_per_1000_items": 1000 * wall / n, "generate_s_per_1000_items": 1000 * stats["generate_s"] / n,
           **stats, "generated_tokens_per_s": stats["generated_tokens"] / stats["generate_s"],
           "device": torch.cuda.get_device_name() if cuda else "cpu", "metrics": res["gsm8k"]}
    print(f"harness gsm8k (hf, bf16, batch {args.harness_batch}, max_gen_toks {max_gen}): {n} items in "
          f"{wall:.1f} s = {1000 * wall / n:.0f} s per 1,000 items ({1000 * stats['generate_s'] / n:.0f} s in "
          f"generate); {stats['generated_tokens']:,} tokens generated over {stats['decode_steps']} decode "
          f"steps, {out['generated_tokens_per_s']:,.0f} tokens/s")
    return out


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from anneal.model.config import Dots1Config
    from anneal.model.dots1 import Dots1ForCausalLM
    from bench_step import slice_arch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--moe-layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096, help="slice width (heads of 128: hidden / 128)")
    p.add_argument("--harness", action="store_true", help="lm-evaluation-harness GSM8K generation instead")
    p.add_argument("--harness-items", type=int, default=64)
    p.add_argument("--harness-batch", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    heads = max(1, args.hidden // 128)
    cfg = Dots1Config.from_hf_dict({**slice_arch(args), "hidden_size": args.hidden, "num_attention_heads": heads,
                                    "num_key_value_heads": heads}, source="bench slice")
    model = Dots1ForCausalLM(cfg, "grouped_mm")
    model.init_weights(seed=0)
    model.to_dtype(torch.bfloat16).eval()
    if args.harness:
        out = {"hidden": args.hidden, "vocab": args.vocab, "layers": cfg.num_hidden_layers,
               "harness": harness(args, model)}
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return
    from anneal.evals.scoring import build_requests, loglikelihoods, rank_items
    from anneal.evals.tasks import load_task
    from test_evals import mc_task

    device = torch.device("cuda")
    model.to(device)
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
