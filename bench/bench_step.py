"""Training-step throughput at dots1 width: the yardstick for every change on the GPU hot path.

The slice: hidden 4096, 32 heads x 128, 1 dense layer (MLP 10944) + 3 MoE layers of 16 routed
experts top-6 (width 1408; one EP-8 rank's share of dots1's 128: each local expert sees the rows
it would see under EP 8) + 2 shared experts, vocab 4096 (`--vocab 152064` for the real LM head),
seq 4096, micro-batch 2, 65,536 tokens per optimizer step, random init, bf16 policy.

Cases (each in its own process, so compile caches and memory do not leak between them):
- `bare`: the step as the trainer runs it (anneal.train.step.accumulate over the micro-batches +
  engine.step: bf16 compute weights, fp32 masters/grad accumulation/AdamW) on random tokens,
  no data pipeline, no logging;
- `trainer`: `python -m anneal` end to end on the bundled demo mixture (data, logging, bias
  update and eval included; tokens/s as the trainer logs it).
Both for engine native|deepspeed x backend x compile on/off x activation recompute
none|selective|full (`--recompute`, model.recompute) x document mask on/off (`model.document_mask`:
attention inside each packed document) x plain or paired 1F1B schedule (`--a2a-overlap`,
parallel.a2a_overlap). The bare
case's rows are packed documents of random lengths (exponential, mean `--doc-len`, 0 = one
document per row); without the mask they only move RoPE, so they cost what plain rows cost.
Reported: median tokens/s over the measured steps (after warm-up), model TFLOP/s (6 x active
params + attention, as anneal.model.config counts it), MFU against the GPU's dense bf16 peak and
against an 8192^3 bf16 matmul timed in the same run, peak GPU memory over the measured steps, and
(bare) its part above the memory at rest between steps (weights, masters, gradients, AdamW): the
activations' peak.

    python bench/bench_step.py --json bench/results/bench_step.json            # the default grid
    python bench/bench_step.py --cases bare --backends triton --compile on     # one row
    python bench/bench_step.py --engines native --backends grouped_mm --compile on --document-mask on off
    python bench/bench_step.py --cases bare --engines native --backends grouped_mm --compile on \
        --recompute none selective full                 # MFU and activation peak of each recompute mode
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def slice_arch(args) -> dict:
    return dict(model_type="dots1", vocab_size=args.vocab, hidden_size=4096, intermediate_size=10944,
                moe_intermediate_size=1408, num_hidden_layers=args.dense_layers + args.moe_layers,
                first_k_dense_replace=args.dense_layers, num_attention_heads=32, num_key_value_heads=32,
                head_dim=128, n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_shared_experts=2,
                routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-5, rope_theta=1e7,
                max_position_embeddings=max(32768, args.seq), tie_word_embeddings=False)


def _ds_env() -> dict:
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}


# --------------------------------------------------------------------------------- one case
def run_bare(case: dict, args) -> dict:
    import torch
    from omegaconf import OmegaConf

    from anneal.config import TrainerCfg
    from anneal.model.dots1 import Dots1ForCausalLM
    from anneal.model.config import Dots1Config
    from anneal.model.precision import PrecisionPolicy
    from anneal.train.engine import Engine
    from anneal.train.paired_schedule import PairedSchedule
    from anneal.train.step import accumulate

    torch.manual_seed(0)
    device = torch.device("cuda")
    cfg = Dots1Config.from_hf_dict(slice_arch(args), source="bench slice")
    model = Dots1ForCausalLM(cfg, case["backend"], recompute=case["recompute"],
                             document_mask=case["document_mask"])
    model.init_weights(seed=0)
    model.to(device).train()
    tcfg = OmegaConf.structured(TrainerCfg(micro_batch_size=args.micro_batch))
    policy = PrecisionPolicy(torch.bfloat16, torch.bfloat16 if case["accum"] == "bf16" else torch.float32,
                             grad_accum_fusion=case["accum"] == "fused")
    if case["engine"] == "deepspeed":
        os.environ.update(_ds_env())
        from anneal.parallel import ds_engine

        ds_engine.init_distributed(device)
        engine = ds_engine.DeepSpeedEngine(model, tcfg, ep_size=1, zero_stage=1, policy=policy)
    else:
        engine = Engine(model, tcfg, policy)
    if case["compile"]:
        model.compile_layers()
    n_micro = args.batch_tokens // (args.seq * args.micro_batch)
    gen = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1), generator=gen)
        pos = packed_positions(args.micro_batch, args.seq + 1, args.doc_len, gen)
        return {"input_ids": ids, "position_ids": pos, "source_ids": torch.zeros_like(ids)}

    paired = PairedSchedule(model, engine) if case["a2a_overlap"] else None

    def one_step(batches):
        if paired is not None:
            paired.accumulate(iter(batches), n_micro, 1, device)
        else:
            accumulate(model, engine, iter(batches), n_micro, 1, device)
        engine.step(1e-5)

    times = []
    for step in range(args.warmup + args.steps):
        batches = [batch() for _ in range(n_micro)]
        torch.cuda.synchronize()
        if step == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        one_step(batches)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    # at rest between steps: weights, fp32 masters + gradient accumulators, AdamW's moments
    static = torch.cuda.memory_allocated() / 2**30
    peak = torch.cuda.max_memory_allocated() / 2**30
    out = {"tokens_per_s": args.batch_tokens / statistics.median(times),
           "step_ms": 1e3 * statistics.median(times), "peak_mem_gb": peak, "static_mem_gb": static,
           "activation_peak_gb": peak - static}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        from anneal.train.profiling import kernel_table

        batches = [batch() for _ in range(n_micro)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            one_step(batches)
            torch.cuda.synchronize()
        out["kernels"] = kernel_table(prof)
    return out


def packed_positions(rows: int, length: int, mean_doc: int, gen):
    """Position ids of rows packed with documents of exponential random lengths (mean `mean_doc`
    tokens; 0: one document per row), restarting at 0 at each document as mixtures.stream does."""
    import torch

    idx = torch.arange(length)
    if not mean_doc:
        return idx.expand(rows, -1).contiguous()
    out = []
    for _ in range(rows):
        lens = torch.empty(2 * length // mean_doc + 8).exponential_(1 / mean_doc, generator=gen).long() + 1
        first = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        starts = torch.zeros(length, dtype=torch.bool)
        starts[first[first < length]] = True
        out.append(idx - torch.cummax(torch.where(starts, idx, 0), 0).values)
    return torch.stack(out)


def run_trainer(case: dict, args) -> dict:
    import yaml

    tokenizer = REPO / "anneal" / "assets" / "tiny-stable"
    n_steps = args.warmup + args.steps
    recipe = {
        "checkpoint": None,
        "model": {"experts_backend": case["backend"], "compile": case["compile"], "document_mask": case["document_mask"],
                  "recompute": case["recompute"], "arch": slice_arch(args)},
        "data": {"mixture": "demo", "seq_len": args.seq, "tokenizer": str(tokenizer), "eval_seqs": 1},
        "schedule": {"start_lr": 3e-4, "batch_tokens": args.batch_tokens,
                     "stages": [{"name": "stage1", "tokens": n_steps * args.batch_tokens, "lr_end": 3e-5}]},
        "parallel": {"a2a_overlap": case["a2a_overlap"]},
        "trainer": {"engine": case["engine"], "device": "cuda", "bf16": True, "micro_batch_size": args.micro_batch,
                    "grad_accum_dtype": "bf16" if case["accum"] == "bf16" else "fp32",
                    "grad_accum_fusion": case["accum"] == "fused", "deterministic": case.get("deterministic", False),
                    "eval_every": "0", "ckpt_every": "0", "log_every": 1},
        "logging": {"wandb": False, "progress": False, "plots": False},
        "export": {"enabled": False},
    }
    if args.vocab > 4096:
        raise SystemExit("the trainer case uses the shipped 4096-token tokenizer: run it with --vocab 4096")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_slice.yaml"
        path.write_text("# @package _global_\n" + yaml.safe_dump(recipe))
        env = {**os.environ, **(_ds_env() if case["engine"] == "deepspeed" else {})}
        proc = subprocess.run([sys.executable, "-m", "anneal", f"recipe={path}", f"run.root={tmp}", "run.name=r"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
        rows = [json.loads(line) for line in (Path(tmp) / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r][args.warmup:]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
            "step_ms": 1e3 * args.batch_tokens / statistics.median(r["tokens_per_s"] for r in steps),
            "peak_mem_gb": max(r.get("gpu_mem_peak_gb", 0.0) for r in steps)}


# ------------------------------------------------------------------------------------ driver
def matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 20 / (time.perf_counter() - t0) / 1e12


def _args_without_json(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


def grid(args) -> list[dict]:
    cases = []
    for mode in args.cases:
        for engine in args.engines:
            for backend in args.backends:
                for comp in args.compile:
                    for recompute in args.recompute:
                        for accum in args.grad_accum:
                            for det in args.deterministic if mode == "trainer" else ["off"]:
                                for mask in args.document_mask:
                                    for overlap in args.a2a_overlap:
                                        cases.append({"mode": mode, "engine": engine, "backend": backend,
                                                      "accum": accum, "compile": comp == "on",
                                                      "recompute": recompute, "grad_ckpt": recompute == "full",
                                                      "document_mask": mask == "on",
                                                      "a2a_overlap": overlap == "on",
                                                      **({"deterministic": True} if det == "on" else {})})
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["bare", "trainer"], choices=["bare", "trainer"])
    ap.add_argument("--engines", nargs="+", default=["native", "deepspeed"], choices=["native", "deepspeed"])
    ap.add_argument("--backends", nargs="+", default=["grouped_mm", "triton"])
    ap.add_argument("--compile", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--recompute", nargs="+", default=["none"], choices=["none", "selective", "full"],
                    help="model.recompute: activations recomputed in the backward (full = the old gradient checkpointing)")
    ap.add_argument("--grad-accum", nargs="+", default=["fused"], choices=["fused", "fp32", "bf16"],
                    help="how gradients are summed over the micro-batches: fused = fp32 with the dense weight-"
                         "gradient GEMMs adding into the sums (trainer.grad_accum_fusion, the default); fp32 = "
                         "fp32 sums through a hook (grad_accum_fusion=false); bf16 = trainer.grad_accum_dtype=bf16")
    ap.add_argument("--deterministic", nargs="+", default=["off"], choices=["on", "off"],
                    help="trainer cases: trainer.deterministic (torch deterministic algorithms, fixed cuBLAS workspace)")
    ap.add_argument("--document-mask", nargs="+", default=["off"], choices=["on", "off"],
                    help="model.document_mask: attention inside each packed document")
    ap.add_argument("--a2a-overlap", nargs="+", default=["off"], choices=["on", "off"],
                    help="parallel.a2a_overlap: the paired 1F1B schedule (anneal.train.paired_schedule)")
    ap.add_argument("--doc-len", type=int, default=1024,
                    help="bare cases: mean document length of the packed rows (exponential); 0 = one per row")
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--moe-layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="bare cases: kernel table of one profiled step")
    ap.add_argument("--top-kernels", type=int, default=20)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()

    if args.one:
        case = json.loads(args.one)
        out = (run_bare if case["mode"] == "bare" else run_trainer)(case, args)
        print("RESULT " + json.dumps(out), flush=True)
        return

    import torch

    from anneal.model.config import Dots1Config
    from anneal.train.devices import device_peak_tflops

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = device_peak_tflops(device)
    mm = matmul_tflops()
    torch.cuda.empty_cache()
    flops_per_token = Dots1Config.from_hf_dict(slice_arch(args)).train_flops_per_token(args.seq)
    print(f"{name}: dense bf16 peak {peak} TFLOP/s, 8192^3 bf16 matmul {mm:.0f} TFLOP/s; "
          f"{flops_per_token / 1e9:.2f} GFLOP per token; torch {torch.__version__}", flush=True)
    rows = []
    hdr = (f"{'mode':<8}{'engine':<10}{'backend':<11}{'compile':>8}{'recomp':>10}{'accum':>6}{'docmask':>8}{'paired':>7}"
           f"{'tok/s':>10}{'step ms':>9}{'TFLOP/s':>9}{'MFU':>7}{'vs mm':>7}{'mem GB':>8}{'act GB':>8}")
    print(hdr, flush=True)
    for case in grid(args):
        argv = [sys.executable, __file__, "--one", json.dumps(case)] + _args_without_json(sys.argv[1:])
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        row = {"device": name, **case, "torch": torch.__version__, "seq": args.seq, "vocab": args.vocab,
               "doc_len": args.doc_len if case["mode"] == "bare" else "demo mixture",
               "batch_tokens": args.batch_tokens, "micro_batch": args.micro_batch, "peak_tflops": peak,
               "matmul_tflops": mm, "flops_per_token": flops_per_token}
        if line is None:
            row["error"] = (proc.stdout + proc.stderr)[-2000:]
            print(f"{case['mode']:<8}{case['engine']:<10}{case['backend']:<11}{str(case['compile']):>8}"
                  f"{case['recompute']:>10}{case['accum']:>6}{str(case['document_mask']):>8}"
                  f"{str(case['a2a_overlap']):>7}  FAILED: {row['error'][-300:]}", flush=True)
        else:
            res = json.loads(line[len("RESULT "):])
            tflops = res["tokens_per_s"] * flops_per_token / 1e12
            row.update(res, model_tflops=tflops, mfu=tflops / peak if peak else None, mfu_vs_matmul=tflops / mm)
            print(f"{case['mode']:<8}{case['engine']:<10}{case['backend']:<11}{str(case['compile']):>8}"
                  f"{case['recompute']:>10}{case['accum']:>6}{str(case['document_mask']):>8}"
                  f"{str(case['a2a_overlap']):>7}{res['tokens_per_s']:>10.0f}{res['step_ms']:>9.1f}{tflops:>9.1f}"
                  f"{(row['mfu'] or 0):>7.1%}{row['mfu_vs_matmul']:>7.1%}{res['peak_mem_gb']:>8.1f}"
                  f"{res.get('activation_peak_gb', float('nan')):>8.1f}", flush=True)
        rows.append(row)
        if "kernels" in row:
            k = row["kernels"]
            print(f"  profiled step: {k['total_ms']:.1f} ms of kernels; by kind: " +
                  ", ".join(f"{kind} {ms:.1f}" for kind, ms in k["by_kind"].items()), flush=True)
            for t in k["top"][:args.top_kernels]:
                print(f"    {t['ms']:8.2f} ms {t['calls']:5d}x  {t['name']}", flush=True)
        if args.json:  # after every row, so a run cut short keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
