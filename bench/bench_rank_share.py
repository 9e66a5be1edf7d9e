"""One EP-8 rank's real share of dots1, trained through `anneal` on one GPU with the optimizer on the
host (issue 24): full width (hidden 4096, 32 heads x 128, dense MLP 10944), 16 of the 128 routed
experts per MoE layer (top-6: the rows a rank's experts see under EP 8) + 2 shared, the real vocab
152,064 (fed by the shipped 4096-token tokenizer: the embedding and LM head cost what the real
vocab's do), seq 4096, DeepSpeed ZeRO-2 with `parallel.offload=optimizer` (CPU Adam).

First the host rates the planner's step estimate takes are measured on this machine (pinned
host<->GPU copies, DeepSpeed's CPU Adam in parameters/s). Then for each layer count: the planner's
GPU and host figures for that exact config (`anneal-plan memory`, fed the measured rates) beside the
run's measured GPU peak, host peak RSS, tokens/s, MFU and the update's share of the step; the
update's share at the short recipe's batch (`recipes/dots1_anneal_short.yaml`: 1,024 micro-batches
per GPU) from the measured update and per-micro-batch times; and, with two or more layer counts, a
line through the measurements extrapolated to dots1's 62 layers beside the planner's figure.

    python bench/bench_rank_share.py --layers 4 12 --micro-batches 16 --steps 3 --json out.json

Layer counts measured in separate calls (a device call's time limit) are fitted together with
`--merge a.json b.json --json both.json` (same device and arguments but `--layers`; no GPU needed).
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

SHORT_RECIPE_MICRO_BATCHES = 2 ** 25 // (8 * 4096)   # recipes/dots1_anneal_short.yaml per GPU, 8 GPUs


def rank_share_arch(layers: int, seq: int) -> dict:
    return dict(model_type="dots1", vocab_size=152064, hidden_size=4096, intermediate_size=10944,
                moe_intermediate_size=1408, num_hidden_layers=layers, first_k_dense_replace=1,
                num_attention_heads=32, num_key_value_heads=32, head_dim=128, n_routed_experts=16,
                num_experts_per_tok=6, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                rms_norm_eps=1e-5, rope_theta=1e7, max_position_embeddings=max(32768, seq),
                tie_word_embeddings=False)


def recipe(layers: int, args) -> dict:
    n_steps = args.warmup + args.steps + bool(args.profile)  # the profiled step comes after the measured ones
    batch = args.micro_batches * args.seq
    return {
        "checkpoint": None,
        "model": {"experts_backend": args.backend, "compile": True, "recompute": args.recompute,
                  "arch": rank_share_arch(layers, args.seq)},
        "data": {"mixture": "demo", "seq_len": args.seq, "tokenizer": str(REPO / "anneal" / "assets" / "tiny-stable"),
                 "eval_seqs": 1},
        "schedule": {"start_lr": 3e-4, "batch_tokens": batch,
                     "stages": [{"name": "stage1", "tokens": n_steps * batch, "lr_end": 3e-5}]},
        "parallel": {"ep_size": 1, "zero_stage": 2, "offload": "optimizer", "offload_chunk_mb": args.offload_chunk_mb},
        "trainer": {"engine": "deepspeed", "device": "cuda", "bf16": True, "micro_batch_size": 1,
                    # no checkpoint: a 12-layer share's (71 GB) does not fit a 64 GB device disk
                    "eval_every": "0", "ckpt_every": "off", "log_every": 1,
                    "profile_steps": [n_steps] if args.profile else []},
        "logging": {"wandb": False, "progress": False, "plots": False},
        "export": {"enabled": False},
    }


# ------------------------------------------------------------------------------- host rates
def _timed(fn, reps: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def measure_rates(cpu_adam_params: int) -> dict:
    """Pinned host<->GPU copy bandwidth (GB/s, 10^9) and DeepSpeed's CPU Adam throughput
    (parameters/s over this machine's cores, fp32 masters and moments as offload keeps them)."""
    import torch
    from omegaconf import OmegaConf

    from anneal.parallel.deepspeed_compat import cpu_adam

    n = 2 ** 28                                    # 1 GiB of fp32
    host = torch.empty(n, dtype=torch.float32).pin_memory()
    dev = torch.empty(n, dtype=torch.float32, device="cuda")
    h2d = 4 * n / _timed(lambda: dev.copy_(host, non_blocking=True), 5) / 1e9
    d2h = 4 * n / _timed(lambda: host.copy_(dev, non_blocking=True), 5) / 1e9
    del host, dev

    p = torch.nn.Parameter(torch.randn(cpu_adam_params))
    p.grad = torch.randn(cpu_adam_params) * 1e-3
    opt = cpu_adam([{"params": [p], "weight_decay": 0.1}], OmegaConf.create({"betas": [0.9, 0.95], "eps": 1e-8}))
    opt.param_groups[0]["lr"] = 3e-4
    opt.step()
    t0 = time.perf_counter()
    for _ in range(3):
        opt.step()
    adam = cpu_adam_params * 3 / (time.perf_counter() - t0)
    return {"pcie_h2d_gb_s": h2d, "pcie_d2h_gb_s": d2h, "cpu_adam_params_per_s": adam,
            "cpu_cores": os.cpu_count(), "cpu_adam_params_timed": cpu_adam_params}


# ------------------------------------------------------------------------------- planner
def planner_figures(path: Path, rates: dict, gpu_mem_gb: float, host_mem_gb: float,
                    layers: int | None = None) -> dict:
    from anneal.cli import compose
    from anneal.host_plan import HostRates, plan_host
    from anneal.memory_plan import layout_from_config, model_config_for_plan, plan_memory

    over = [f"recipe={path}"] + ([f"model.arch.num_hidden_layers={layers}"] if layers else [])
    cfg = compose(over)
    mcfg, _ = model_config_for_plan(cfg)
    lay = layout_from_config(cfg, 1, 1, gpu_mem_gb, 6.0, host_mem_gb)
    host_rates = HostRates(pcie_gb_s=min(rates["pcie_h2d_gb_s"], rates["pcie_d2h_gb_s"]),
                           cpu_adam_params_per_s=rates["cpu_adam_params_per_s"])
    plan = plan_memory(mcfg, lay)
    hp = plan_host(mcfg, plan, host_rates)
    return {"layers": mcfg.num_hidden_layers, "params": plan.params_local, "gpu_gib": plan.total,
            "gpu_rows": plan.rows, "host_rank_gib": sum(v for k, v in hp.rows.items() if k != "data pipeline"),
            "host_rows": hp.rows, "step_s": hp.step_s, "times": hp.times, "optimizer_share": hp.optimizer_share,
            "tokens_per_s": hp.tokens_per_s}


# ------------------------------------------------------------------------------- the run
def watch_host_memory(proc: subprocess.Popen, every_s: float = 15.0) -> None:
    """Until `proc` ends, print every `every_s` the RSS of `anneal` and of its child processes (the
    compiler's workers) and the host's available memory: a 12-layer run once stalled at start-up with
    nothing logged, and an 8-layer one was killed with the host full (2026-12-07)."""
    import psutil

    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            main = psutil.Process(proc.pid)
            rss = main.memory_info().rss / 2 ** 30
            children = sum(p.memory_info().rss for p in main.children(recursive=True)) / 2 ** 30
        except psutil.NoSuchProcess:            # a process ended between the listing and the read
            rss = children = float("nan")
        print(f"[{time.perf_counter() - t0:5.0f} s] anneal RSS {rss:6.1f} GiB, its children {children:5.1f} GiB, "
              f"host available {psutil.virtual_memory().available / 2 ** 30:6.1f} GiB", flush=True)
        try:
            proc.wait(timeout=every_s)
        except subprocess.TimeoutExpired:
            pass


def run_anneal(path: Path, root: Path) -> list[dict]:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    proc = subprocess.Popen([sys.executable, "-m", "anneal", f"recipe={path}", f"run.root={root}", "run.name=r"],
                            cwd=REPO, env=env)          # its log streams through: a slow phase shows where
    watch_host_memory(proc)
    metrics = root / "r" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if proc.returncode:
        keys = ("step", "tokens_per_s", "mfu", "update_s", "gpu_mem_peak_gb", "host_mem_gb", "host_mem_peak_gb",
                "host_pinned_gb")
        done = [{k: r[k] for k in keys if k in r} for r in rows]
        raise RuntimeError(f"anneal exited with {proc.returncode} (its log is above; the steps it logged: {done})")
    return rows


def measure(layers: int, args, rates: dict, gpu_mem_gb: float, host_mem_gb: float) -> dict:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rank_share.yaml"
        path.write_text("# @package _global_\n" + yaml.safe_dump(recipe(layers, args)))
        plan = planner_figures(path, rates, gpu_mem_gb, host_mem_gb)
        plan62 = planner_figures(path, rates, gpu_mem_gb, host_mem_gb, layers=62)
        t0 = time.perf_counter()
        rows = run_anneal(path, Path(tmp))
        wall = time.perf_counter() - t0
        tables = sorted((Path(tmp) / "r" / "profile").glob("rank0_steps*.json"))
        profile = json.loads(tables[0].read_text()) if tables else None
    steps = [r for r in rows if "tokens_per_s" in r][args.warmup:args.warmup + args.steps]
    tps = statistics.median(r["tokens_per_s"] for r in steps)
    step_s = args.micro_batches * args.seq / tps
    update_s = statistics.median(r["update_s"] for r in steps)
    micro_s = (step_s - update_s) / args.micro_batches
    short_share = update_s / (SHORT_RECIPE_MICRO_BATCHES * micro_s + update_s)
    return {"layers": layers, "params": plan["params"], "wall_s": wall, "tokens_per_s": tps,
            "mfu": statistics.median(r.get("mfu", float("nan")) for r in steps), "step_s": step_s,
            "update_s": update_s, "update_share": update_s / step_s, "micro_batch_s": micro_s,
            "update_share_short_recipe": short_share,
            "gpu_peak_gib": max(r["gpu_mem_peak_gb"] for r in steps),
            "host_peak_gib": max(r["host_mem_peak_gb"] for r in steps),
            # resident size while training (start-up's transients excluded: with a random init the
            # engine holds an fp32 copy of the weights while DeepSpeed builds its masters)
            "host_steady_gib": max(r["host_mem_gb"] for r in steps),
            "host_pinned_gib": max(r.get("host_pinned_gb", float("nan")) for r in steps),  # part of the above
            "loss_first": rows[0].get("loss"), "loss_last": steps[-1].get("loss"),
            "planner": plan, "planner_62": plan62, "profile": profile}


def fit_62(results: list[dict], key: str) -> float | None:
    """A line through (layers, measured `key`) at 62 layers (least squares); None with one layer count."""
    xs = [r["layers"] for r in results]
    if len(set(xs)) < 2:
        return None
    ys = [r[key] for r in results]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my + slope * (62 - mx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12], help="layer counts (1 dense + the rest MoE)")
    ap.add_argument("--micro-batches", type=int, default=16, help="micro-batches of 1 x seq per step")
    ap.add_argument("--steps", type=int, default=2, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--backend", default="grouped_mm", choices=("grouped_mm", "triton", "torch"))
    ap.add_argument("--recompute", default="full", choices=("none", "selective", "full"),
                    help="full: what parallel=dots1_8gpu_offload uses at 62 layers")
    ap.add_argument("--offload-chunk-mb", type=int, default=256,
                    help="parallel.offload_chunk_mb: the streamed update's chunk; 0 = DeepSpeed's own step")
    ap.add_argument("--cpu-adam-params", type=int, default=2 ** 28)
    ap.add_argument("--profile", action="store_true",
                    help="one more step, recorded by torch.profiler (trainer.profile_steps): its kernel table by kind")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="fit the results of earlier runs' JSON files together (no run)")
    args = ap.parse_args()
    if args.merge:
        write_json(args.json, merge([json.loads(Path(f).read_text()) for f in args.merge]))
        return

    import torch

    from anneal.train.devices import available_host_memory_gb

    gpu_mem_gb = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    host_mem_gb = available_host_memory_gb()
    rates = measure_rates(args.cpu_adam_params)
    print(f"{torch.cuda.get_device_name(0)}, {gpu_mem_gb:.0f} GiB; host {host_mem_gb:.0f} GiB, {os.cpu_count()} cores; "
          f"PCIe pinned H2D {rates['pcie_h2d_gb_s']:.1f} GB/s, D2H {rates['pcie_d2h_gb_s']:.1f} GB/s; "
          f"CPU Adam {rates['cpu_adam_params_per_s'] / 1e9:.2f}B params/s", flush=True)
    results = []
    for layers in args.layers:
        try:
            r = measure(layers, args, rates, gpu_mem_gb, host_mem_gb)
        except RuntimeError as e:
            print(f"{layers} layers FAILED:\n{e}", flush=True)
            continue
        results.append(r)
        p = r["planner"]
        print(f"{layers:>3} layers {r['params'] / 1e9:5.2f}B params | {r['tokens_per_s']:8,.0f} tok/s  MFU "
              f"{r['mfu']:.1%} | step {r['step_s']:6.2f} s, update {r['update_s']:5.2f} s ({r['update_share']:.1%}; "
              f"at the short recipe's {SHORT_RECIPE_MICRO_BATCHES} micro-batches {r['update_share_short_recipe']:.1%}) | "
              f"GPU peak {r['gpu_peak_gib']:5.1f} GiB (planner {p['gpu_gib']:5.1f}, "
              f"{r['gpu_peak_gib'] / p['gpu_gib'] - 1:+.1%}) | host while training {r['host_steady_gib']:5.1f} GiB "
              f"({r['host_pinned_gib']:.1f} pinned), "
              f"peak {r['host_peak_gib']:5.1f} (planner {p['host_rank_gib']:5.1f}: "
              f"{r['host_steady_gib'] / p['host_rank_gib'] - 1:+.1%}, {r['host_peak_gib'] / p['host_rank_gib'] - 1:+.1%}) | planner step "
              f"{p['step_s']:.2f} s, update share {p['optimizer_share']:.1%}", flush=True)
        write_json(args.json, summarize(results, rates, args, gpu_mem_gb, host_mem_gb))   # a later timeout keeps this
    write_json(args.json, summarize(results, rates, args, gpu_mem_gb, host_mem_gb, report=True))


def write_json(path: str | None, out: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(out, indent=1))


def merge(runs: list[dict]) -> dict:
    """One summary (and 62-layer fit) over several runs' JSON; refuses runs whose device or arguments
    other than the layer counts differ, since their points would not lie on one line."""
    def key(run):
        return run["device"], {k: v for k, v in run["args"].items() if k not in ("layers", "json", "merge")}

    for run in runs[1:]:
        if key(run) != key(runs[0]):
            raise SystemExit(f"--merge: runs differ beyond --layers: {key(runs[0])} vs {key(run)}")
    results = sorted((r for run in runs for r in run["results"]), key=lambda r: r["layers"])
    args = {**runs[0]["args"], "layers": [r["layers"] for r in results]}
    return summarize(results, runs[0]["rates"], argparse.Namespace(**args), runs[0]["gpu_mem_gib"],
                     runs[0]["host_mem_gib"], report=True, device=(runs[0]["device"], runs[0]["torch"]))


def summarize(results: list[dict], rates: dict, args, gpu_mem_gb: float, host_mem_gb: float,
              report: bool = False, device: tuple[str, str] | None = None) -> dict:
    if device is None:
        import torch

        device = torch.cuda.get_device_name(0), torch.__version__
    out = {"device": device[0], "torch": device[1], "gpu_mem_gib": gpu_mem_gb,
           "host_mem_gib": host_mem_gb, "rates": rates, "args": vars(args), "results": results}
    if results:
        p62 = results[-1]["planner_62"]
        out["at_62_layers"] = {"gpu_peak_gib_fit": fit_62(results, "gpu_peak_gib"),
                               "host_peak_gib_fit": fit_62(results, "host_peak_gib"),
                               "host_steady_gib_fit": fit_62(results, "host_steady_gib"),
                               "update_s_fit": fit_62(results, "update_s"),
                               "micro_batch_s_fit": fit_62(results, "micro_batch_s"),
                               "planner_gpu_gib": p62["gpu_gib"], "planner_host_rank_gib": p62["host_rank_gib"]}
        a = out["at_62_layers"]
        if report and a["gpu_peak_gib_fit"] is not None:
            print(f" 62 layers (line through the measurements): GPU {a['gpu_peak_gib_fit']:.1f} GiB (planner "
                  f"{a['planner_gpu_gib']:.1f}), host {a['host_steady_gib_fit']:.1f} GiB per rank while training, "
                  f"peak {a['host_peak_gib_fit']:.1f} (planner "
                  f"{a['planner_host_rank_gib']:.1f}), update {a['update_s_fit']:.1f} s, micro-batch "
                  f"{a['micro_batch_s_fit']:.3f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
