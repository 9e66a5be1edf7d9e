"""How much expert-parallel all-to-all the paired 1F1B schedule (parallel.a2a_overlap) takes off
the critical path: 2 processes, EP 2, the DeepSpeed engine (ZeRO 1), the plain and the paired
schedule on the same model and batches, alternating step by step in one run.

`--device cpu` (default): gloo, a small model, fp32. Per schedule (median over the measured steps):
- step ms: forward + backward of the step's micro-batches + the optimizer step;
- a2a exposed ms: time the process spent blocked on the row all-to-alls (plain: the whole
  synchronous call; paired: only `AsyncAllToAll.wait()`, the rest ran while it computed);
- a2a launch ms: time to start the asynchronous ones (paired);
- counts ms: the blocking exchange of per-expert row counts (the same in both);
- compute ms: the rest (step - exposed - launch - counts).

`--device cuda` (2 GPUs, NCCL): the dots1-shaped slice of bench/bench_step.py with 32 experts (16
per GPU: an EP-2 share), bf16 policy, compiled layers. Step ms and tokens/s per GPU, peak memory,
and from one profiled step (the micro-batches, without the optimizer step) the all-to-all kernel
time (NCCL send/recv) and its exposed part: the time an all-to-all kernel runs while no compute
kernel does, as a share of the step.

    python bench/bench_overlap.py --json bench/results/bench_overlap.json
    python bench/bench_overlap.py --device cuda --json bench/results/bench_overlap_2gpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def arch(args) -> dict:
    return dict(model_type="dots1", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                moe_intermediate_size=args.hidden // 2, num_hidden_layers=1 + args.moe_layers, first_k_dense_replace=1,
                num_attention_heads=4, num_key_value_heads=4, head_dim=args.hidden // 4, n_routed_experts=args.experts,
                num_experts_per_tok=args.top_k, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=args.seq, tie_word_embeddings=False)


class Timers:
    """Wall time inside the collectives, by kind (patched around torch.distributed and AsyncAllToAll)."""

    def __init__(self):
        self.ms = {"a2a_exposed": 0.0, "a2a_launch": 0.0, "counts": 0.0}

    def install(self) -> None:
        import torch
        import torch.distributed as dist

        from moe import a2a

        original = dist.all_to_all_single
        timers = self

        def timed(out, inp, *a, async_op=False, **kw):
            t0 = time.perf_counter()
            work = original(out, inp, *a, async_op=async_op, **kw)
            kind = "counts" if inp.dtype == torch.int64 else ("a2a_launch" if async_op else "a2a_exposed")
            timers.ms[kind] += 1e3 * (time.perf_counter() - t0)
            return work

        dist.all_to_all_single = timed      # moe.ep and moe.a2a call it as dist.all_to_all_single
        wait = a2a.AsyncAllToAll.wait

        def timed_wait(handle):
            t0 = time.perf_counter()
            out = wait(handle)
            timers.ms["a2a_exposed"] += 1e3 * (time.perf_counter() - t0)
            return out

        a2a.AsyncAllToAll.wait = timed_wait

    def take(self) -> dict:
        out, self.ms = self.ms, {k: 0.0 for k in self.ms}
        return out


def kernel_intervals(prof) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every CUDA kernel of a profiled region (from its chrome trace)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "kernel"]


def exposed_all_to_all_ms(kernels: list[tuple[float, float, str]]) -> tuple[float, float]:
    """(all-to-all kernel ms, of which exposed ms): the union of NCCL send/recv kernels
    (all_to_all_single) and the part of it that no compute (non-NCCL) kernel covers."""
    comm = _union([(a, b) for a, b, n in kernels if "SendRecv" in n or "AllToAll" in n])
    compute = _union([(a, b) for a, b, n in kernels if "nccl" not in n.lower()])
    exposed = 0.0
    for a, b in comm:
        exposed += (b - a) - sum(max(0.0, min(b, d) - max(a, c)) for c, d in compute)
    return sum(b - a for a, b in comm) / 1e3, exposed / 1e3


def busy_ms(kernels: list[tuple[float, float, str]]) -> tuple[float, float, float]:
    """(compute busy ms, compute kernel ms summed, GPU busy ms): the union of compute (non-NCCL)
    kernels, their summed durations, and the union of all kernels; region - GPU busy is idle."""
    compute = [(a, b) for a, b, n in kernels if "nccl" not in n.lower()]
    return (sum(b - a for a, b in _union(compute)) / 1e3, sum(b - a for a, b in compute) / 1e3,
            sum(b - a for a, b in _union([(a, b) for a, b, _ in kernels])) / 1e3)


def _union(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    import torch
    import torch.distributed as dist

    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    from types import SimpleNamespace

    from anneal.model.config import Dots1Config
    from anneal.model.dots1 import Dots1ForCausalLM
    from anneal.model.precision import PrecisionPolicy
    from anneal.parallel import ds_engine
    from anneal.train.paired_schedule import PairedSchedule
    from anneal.train.step import accumulate

    ds_engine.init_distributed(device)
    timers = Timers()
    if not cuda:
        timers.install()
    tcfg = SimpleNamespace(micro_batch_size=args.micro_batch, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1,
                           grad_clip=1.0, bf16=cuda)
    if cuda:
        from bench.bench_step import slice_arch

        mcfg = slice_arch(SimpleNamespace(vocab=args.vocab, dense_layers=1, moe_layers=args.moe_layers,
                                          experts=args.experts, top_k=args.top_k, seq=args.seq))
    else:
        mcfg = arch(args)
    runs = {}
    for name in ("plain", "paired"):
        torch.manual_seed(0)
        model = Dots1ForCausalLM(Dots1Config.from_hf_dict(mcfg), args.backend)
        model.init_weights(seed=0)
        model.to(device).train()
        engine = ds_engine.DeepSpeedEngine(model, tcfg, ep_size=world, zero_stage=1,
                                           policy=PrecisionPolicy(torch.bfloat16) if cuda else None)
        if cuda and args.compile:
            model.compile_layers()
        runs[name] = (model, engine, PairedSchedule(model, engine) if name == "paired" else None)
    gen = torch.Generator().manual_seed(rank)
    rows = {name: [] for name in runs}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def micro_batches(model, engine, paired, batches):
        if paired is not None:
            return paired.accumulate(iter(batches), args.n_micro, 1, device)
        return accumulate(model, engine, iter(batches), args.n_micro, 1, device)

    first_loss = {}
    for step in range(args.warmup + args.steps):
        batches = [{"input_ids": (ids := torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1), generator=gen)),
                    "position_ids": torch.arange(args.seq + 1).expand_as(ids).contiguous(),
                    "source_ids": torch.zeros_like(ids)} for _ in range(args.n_micro)]
        for name, (model, engine, paired) in runs.items():
            dist.barrier()
            sync()
            if cuda:  # this schedule's activations: the peak above what is allocated at rest
                at_rest = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            timers.take()
            t0 = time.perf_counter()
            sums = micro_batches(model, engine, paired, batches)
            engine.step(1e-4)
            sync()
            ms = 1e3 * (time.perf_counter() - t0)
            if step == 0:
                first_loss[name] = float(sums["loss_sum"].sum() / sums["count"].sum())
            parts = timers.take()
            if cuda:
                parts["activation_peak_gb"] = (torch.cuda.max_memory_allocated() - at_rest) / 2**30
            if step >= args.warmup:
                rows[name].append({"step_ms": ms, **parts,
                                   "compute": ms - parts["a2a_exposed"] - parts["a2a_launch"] - parts["counts"]})
    result = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}
    for name, (model, engine, paired) in runs.items():
        result[name]["first_step_loss"] = first_loss[name]
        if cuda:
            from torch.profiler import ProfilerActivity, profile

            result[name]["tokens_per_s_per_gpu"] = args.n_micro * args.micro_batch * args.seq / result[name]["step_ms"] * 1e3
            dist.barrier()
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                micro_batches(model, engine, paired, batches)
                sync()
                region_ms = 1e3 * (time.perf_counter() - t0)
            engine.step(1e-4)
            kernels = kernel_intervals(prof)
            a2a_ms, exposed_ms = exposed_all_to_all_ms(kernels)
            compute_busy, compute_sum, gpu_busy = busy_ms(kernels)
            result[name].update(profiled_micro_batches_ms=region_ms, a2a_kernel_ms=a2a_ms, a2a_exposed_ms=exposed_ms,
                                a2a_exposed_share=exposed_ms / region_ms, compute_busy_ms=compute_busy,
                                compute_kernel_ms=compute_sum, gpu_idle_ms=region_ms - gpu_busy)
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="cuda: compiled layers")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--moe-layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--n-micro", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--backend", default="grouped_mm")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    import torch.multiprocessing as mp

    sys.path.insert(0, str(REPO / "tests"))
    from _dist import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 2, port, args, queue)) for port in [free_port()] for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
    plain, paired = result["plain"], result["paired"]
    if args.device == "cuda":
        print(f"2 GPUs ({torch.cuda.get_device_name(0)}), NCCL, EP 2, DeepSpeed ZeRO 1, bf16; dots1 slice: hidden 4096, "
              f"1 dense + {args.moe_layers} MoE layers of {args.experts} experts top-{args.top_k} (16 per GPU), "
              f"{args.n_micro} micro-batches x {args.micro_batch} x {args.seq} tokens per GPU; backend {args.backend}; "
              f"compile {args.compile}; torch {torch.__version__}; median of {args.steps} steps (rank 0)")
        print(f"{'schedule':<10}{'step ms':>9}{'tok/s/GPU':>11}{'act GB':>8}{'a2a kernel ms':>15}{'exposed ms':>12}"
              f"{'exposed share':>15}{'compute busy':>14}{'kernel sum':>12}{'GPU idle':>10}{'first loss':>12}")
        for name, r in result.items():
            print(f"{name:<10}{r['step_ms']:>9.1f}{r['tokens_per_s_per_gpu']:>11.0f}{r['activation_peak_gb']:>8.1f}"
                  f"{r['a2a_kernel_ms']:>15.1f}{r['a2a_exposed_ms']:>12.1f}{r['a2a_exposed_share']:>15.1%}"
                  f"{r['compute_busy_ms']:>14.1f}{r['compute_kernel_ms']:>12.1f}{r['gpu_idle_ms']:>10.1f}"
                  f"{r['first_step_loss']:>12.6f}")
        print("(profiled: the micro-batches of one step, without the optimizer step; compute busy = union of "
              "compute kernels, kernel sum = their summed durations, GPU idle = no kernel on any stream)")
        hidden = 1 - paired["a2a_exposed_ms"] / plain["a2a_exposed_ms"] if plain["a2a_exposed_ms"] else float("nan")
        print(f"paired/plain step time {paired['step_ms'] / plain['step_ms']:.3f}; exposed all-to-all "
              f"{plain['a2a_exposed_ms']:.1f} -> {paired['a2a_exposed_ms']:.1f} ms ({hidden:.0%} hidden)")
    else:
        print(f"2 processes, gloo, EP 2, DeepSpeed ZeRO 1; hidden {args.hidden}, {args.moe_layers} MoE layers of "
              f"{args.experts} experts top-{args.top_k}, {args.n_micro} micro-batches x {args.micro_batch} x {args.seq} "
              f"tokens per rank; backend {args.backend}; torch {torch.__version__}; median of {args.steps} steps (ms, rank 0)")
        print(f"{'schedule':<10}{'step':>9}{'a2a exposed':>13}{'a2a launch':>12}{'counts':>9}{'compute':>9}{'first loss':>12}")
        for name, r in result.items():
            print(f"{name:<10}{r['step_ms']:>9.1f}{r['a2a_exposed']:>13.1f}{r['a2a_launch']:>12.1f}{r['counts']:>9.1f}"
                  f"{r['compute']:>9.1f}{r['first_step_loss']:>12.6f}")
        print(f"paired/plain step time {paired['step_ms'] / plain['step_ms']:.3f}; exposed all-to-all "
              f"{plain['a2a_exposed']:.1f} -> {paired['a2a_exposed']:.1f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__,
                                               "date": datetime.date.today().isoformat(), **result,
                                               "paired_vs_plain_step": paired["step_ms"] / plain["step_ms"]}, indent=2))


if __name__ == "__main__":
    main()
