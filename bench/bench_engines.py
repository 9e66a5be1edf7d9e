"""Engine agreement at dots1 width: `python -m anneal` on the slice with the native engine and with
DeepSpeed, each run twice (the second run of an engine is its run-to-run noise), same random init,
same data, same schedule. Prints per step the loss and grad norm of every run and the worst
DeepSpeed-vs-native and run-to-run differences; writes JSON.

The slice is bench_step's (hidden 4096, 1 dense + 3 MoE layers of 16 experts top-6, seq 4096,
micro-batch 2, 65,536 tokens = 8 micro-batches per step, bf16 policy), on the demo mixture with
the shipped 4096-token tokenizer, eval off, eager (compile changes nothing the engines disagree on
and costs a minute a run).

    python bench/bench_engines.py --steps 20 --start-lr 3e-5 --json bench/results/bench_engines.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench_step import REPO, _ds_env, slice_arch


def run(engine: str, args, root: Path, name: str) -> list[dict]:
    batch = args.seq * args.micro_batch * args.micro_batches
    recipe = {
        "checkpoint": None,
        "model": {"experts_backend": "grouped_mm", "compile": args.compile, "arch": slice_arch(args)},
        "data": {"mixture": "demo", "seq_len": args.seq, "tokenizer": str(REPO / "anneal" / "assets" / "tiny-stable"),
                 "eval_seqs": 0},
        "schedule": {"start_lr": args.start_lr, "batch_tokens": batch,
                     "stages": [{"name": "stage1", "tokens": args.steps * batch, "lr_end": args.start_lr / 10}]},
        "trainer": {"engine": engine, "device": "cuda", "bf16": True, "micro_batch_size": args.micro_batch,
                    "eval_every": "0", "ckpt_every": "0", "log_every": 1},
        "logging": {"wandb": False, "progress": False, "plots": False},
        "export": {"enabled": False},
    }
    path = root / f"{name}.yaml"
    path.write_text("# @package _global_\n" + yaml.safe_dump(recipe))
    env = {**os.environ, **(_ds_env() if engine == "deepspeed" else {})}
    proc = subprocess.run([sys.executable, "-m", "anneal", f"recipe={path}", f"run.root={root}", f"run.name={name}"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in rows if "grad_norm" in r]


def worst(a: list[dict], b: list[dict], key: str) -> tuple[float, int]:
    """Largest relative difference |a - b| / |a| over the steps, and its step."""
    return max((abs(x[key] - y[key]) / abs(x[key]), x["step"]) for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--start-lr", type=float, default=3e-5)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--moe-layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--runs", nargs="+", default=["native_a", "native_b", "deepspeed_a", "deepspeed_b"],
                    help="which runs (engine_x); leave out the b runs when the run-to-run noise is known")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            runs[name] = run(name.split("_")[0], args, Path(tmp), name)
            if args.json:  # after every run, so that a run cut short by a time limit still reports
                Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print(f"{'step':>4} " + " ".join(f"{n + ' loss':>15} {n + ' gnorm':>16}" for n in runs))
    first = next(iter(runs.values()))
    for i in range(len(first)):
        print(f"{first[i]['step']:>4} " + " ".join(
            f"{r[i]['loss']:>15.6f} {r[i]['grad_norm']:>16.5f}" for r in runs.values()))
    summary = {}
    for label, a, b in (("deepspeed vs native", "native_a", "deepspeed_a"), ("native run to run", "native_a", "native_b"),
                        ("deepspeed run to run", "deepspeed_a", "deepspeed_b")):
        for key in ("loss", "grad_norm"):
            if a not in runs or b not in runs:
                continue
            rel, step = worst(runs[a], runs[b], key)
            summary[f"{label}: {key}"] = {"max_rel_diff": rel, "at_step": step}
            print(f"{label:>22} {key:>9}: max relative difference {rel:.2e} (step {step})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
