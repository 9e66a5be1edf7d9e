"""Trainer throughput: the embedded demo anneal (tiny dots1-shaped model, 491K tokens, batch 4096
tokens) once per experts backend, in one process each, side by side. Prints a table of median
tokens/s (steps 6+, after warm-up) and the final eval loss; writes JSON.

    python bench/bench_trainer.py --backends torch grouped_mm triton --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_backend(backend: str, root: Path, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anneal", "logging.wandb=false", "logging.progress=false",
                    "logging.plots=false", "export.enabled=false", f"run.root={root}", f"run.name={backend}",
                    f"model.experts_backend={backend}", *extra], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (root / backend / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][5:]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {"backend": backend, "steps": sum("loss" in r for r in rows), "median_tokens_per_s": statistics.median(tps),
            "wall_s": wall, "eval_loss_first": evals[0], "eval_loss_last": evals[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["torch", "grouped_mm"])
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="extra `anneal` overrides, e.g. trainer.device=cuda")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_backend(b, Path(tmp), args.overrides) for b in args.backends]
    base = results[0]["median_tokens_per_s"]
    print(f"{'backend':<12}{'steps':>6}{'tok/s':>10}{'vs first':>9}{'wall s':>8}{'eval loss':>17}")
    for r in results:
        print(f"{r['backend']:<12}{r['steps']:>6}{r['median_tokens_per_s']:>10.0f}{r['median_tokens_per_s'] / base:>8.2f}x"
              f"{r['wall_s']:>8.1f}{r['eval_loss_first']:>8.3f} -> {r['eval_loss_last']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
