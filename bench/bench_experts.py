"""Routed-expert SwiGLU MLP on dots1 shapes: per-expert loop vs torch._grouped_mm vs our Triton kernels.

One process, one table. Cases (H=4096, I=1408, bf16, tokens already grouped by expert, as in issue 4):
  t8k   :  8,192 tokens, 128 experts, top-6   (49,152 routed rows)
  t16k  : 16,384 tokens, 128 experts, top-6   (98,304 routed rows)
  ep8   : an EP-8 share: 16 local experts, 24,576 routed rows
  slice :  8,192 tokens, 16 experts, top-6    (49,152 routed rows: one micro-batch of bench_step's slice)
plus `dense` (one SwiGLU MLP over the same rows: the same FLOPs as one big matmul pair), the routed
path (gather -> MLP -> weighted combine) for t8k, and a whole MoE layer (router + dispatch + routed +
shared experts) against transformers' Dots1MoE.

FLOPs: forward 6*M*H*I (gate/up 4*M*H*I, down 2*M*H*I); forward+backward counted as 3x forward.
Timing: triton.testing.do_bench (CUDA events, median). Forward is timed under no_grad; forward+backward
as forward then torch.autograd.grad of every input (no .grad accumulation).

    python bench/bench_experts.py [--json bench/results/bench_experts.json] [--breakdown] [--no-layer] [--no-loop]

`--breakdown` adds per-kernel rows: each Triton kernel, the weight gradients added into fp32 sums by
each accumulating epilogue alone, the K-slot sum (Triton vs torch), and torch._grouped_mm's GEMMs.

The JSON has `rows` (one per case and implementation) and `summary`: per case the fwd and fwd+bwd ms of
grouped_mm, triton and dense and the ratios triton_vs_grouped_mm_fwd / triton_vs_grouped_mm_fwdbwd
(grouped_mm time / triton time: > 1 means triton is faster).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from moe.experts import GroupedMMBackend, TorchLoopBackend, get_backend  # noqa: E402

H, I = 4096, 1408
CASES = {
    "t8k": dict(T=8192, E=128, K=6),
    "t16k": dict(T=16384, E=128, K=6),
    "ep8": dict(T=32768, E=128, K=6, local=16),  # the rows that land on experts 0..15 of 128 (~24.6k)
    "slice": dict(T=8192, E=16, K=6),  # bench_step's slice: one micro-batch's routed rows (49,152)
}


def _bench(fn, ms_warm=25, ms_rep=200):
    return do_bench(fn, warmup=ms_warm, rep=ms_rep, return_mode="median")


def _routing(T, E, K, gen, device):
    return torch.rand(T, E, generator=gen, device=device).topk(K, -1).indices


def make_grouped(case, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    c = CASES[case]
    idx = _routing(c["T"], c["E"], c["K"], gen, device)
    E = c.get("local", c["E"])
    counts = torch.bincount(idx.flatten(), minlength=c["E"])[:E]
    M = int(counts.sum())
    x = torch.randn(M, H, generator=gen, device=device, dtype=dtype)
    wgu = torch.randn(E, H, 2 * I, generator=gen, device=device, dtype=dtype) / H ** 0.5
    wd = torch.randn(E, I, H, generator=gen, device=device, dtype=dtype) / I ** 0.5
    dy = torch.randn(M, H, generator=gen, device=device, dtype=dtype)
    return dict(x=x, counts=counts, wgu=wgu, wd=wd, dy=dy, M=M, E=E)


def dense_mlp(x, _counts, wgu, wd):
    return F.linear(F.silu(x @ wgu[0][:, :I]) * (x @ wgu[0][:, I:]), wd[0].t())


def time_grouped(fn, d, with_bwd=True):
    x, counts, wgu, wd, dy = d["x"], d["counts"], d["wgu"], d["wd"], d["dy"]
    with torch.no_grad():
        fwd = _bench(lambda: fn(x, counts, wgu, wd))
    if not with_bwd:
        return fwd, None
    xs, g, w = (t.detach().requires_grad_() for t in (x, wgu, wd))

    def step():
        out = fn(xs, counts, g, w)
        torch.autograd.grad(out, [xs, g, w], dy)
    return fwd, _bench(step)


def rel_errors(fn, ref_fn, d):
    """Relative L2 difference of out, dx, dWgu, dWd between two implementations (same bf16 inputs)."""
    res = []
    for f in (fn, ref_fn):
        xs, g, w = (d[k].detach().requires_grad_() for k in ("x", "wgu", "wd"))
        out = f(xs, d["counts"], g, w)
        res.append([out, *torch.autograd.grad(out, [xs, g, w], d["dy"])])
    return {n: ((a.float() - b.float()).norm() / b.float().norm()).item()
            for n, a, b in zip(("out", "dx", "dWgu", "dWd"), *res)}


def breakdown(d):
    """Per-kernel times of our backend on one case (forward with saved activations + backward)."""
    from moe.kernels import grouped as G
    x, counts, wgu, wd, dy, M, E = (d[k] for k in ("x", "counts", "wgu", "wd", "dy", "M", "E"))
    c32 = counts.to(torch.int32)
    h, gu = G.gate_up_fwd(x, None, wgu, c32, M, save_gu=True)
    out = torch.empty(M, H, device=x.device, dtype=x.dtype)
    dgu, hw, _ = G.down_bwd(dy, None, wd, gu, None, c32, M)
    gu_t = (wgu.stride(0), wgu.stride(2), wgu.stride(1))
    wd_s = (wd.stride(0), wd.stride(1), wd.stride(2))
    o1, o2 = torch.empty_like(wgu), torch.empty_like(wd)
    gemm = 2.0 * M * H * I
    rows = [
        ("fwd gate_up+swiglu", 2 * gemm, lambda: G.gate_up_fwd(x, None, wgu, c32, M, save_gu=True)),
        ("fwd down", gemm, lambda: G.rows_gemm(h, wd, wd_s, H, I, c32, out)),
        ("bwd dh+swiglu'", gemm, lambda: G.down_bwd(dy, None, wd, gu, None, c32, M)),
        ("bwd dx", 2 * gemm, lambda: G.rows_gemm(dgu, wgu, gu_t, H, 2 * I, c32, out)),
        ("bwd dWgu", 2 * gemm, lambda: G.wgrad(x, None, dgu, None, c32, o1)),
        ("bwd dWd", gemm, lambda: G.wgrad(hw, None, dy, None, c32, o2)),
    ]
    res = []
    for name, flops, fn in rows:
        ms = _bench(fn)
        res.append(dict(kernel=name, ms=ms, tflops=flops / ms / 1e9))
    # the weight gradients added into fp32 accumulators (gradient-accumulation fusion), by each way
    # of adding alone (the autotuner picks among the three in training)
    a1, a2 = torch.zeros_like(wgu, dtype=torch.float32), torch.zeros_like(wd, dtype=torch.float32)
    all_into = G._k_wgrad_into.configs
    for mode, label in ((G.ACC_READ, "read-add-write"), (G.ACC_ATOMIC, "atomic"), (G.ACC_TMA, "TMA reduce")):
        G._k_wgrad_into.configs = [c for c in all_into if c.kwargs["ACC_MODE"] == mode]
        G._k_wgrad_into.cache = {}
        for name, flops, fn in ((f"bwd dWgu into fp32, {label}", 2 * gemm,
                                 lambda: G.wgrad(x, None, dgu, None, c32, a1, accumulate=True)),
                                (f"bwd dWd into fp32, {label}", gemm,
                                 lambda: G.wgrad(hw, None, dy, None, c32, a2, accumulate=True))):
            try:
                ms = _bench(fn)
                res.append(dict(kernel=name, ms=ms, tflops=flops / ms / 1e9))
            except Exception as e:  # noqa: BLE001  (a mode this Triton cannot compile)
                res.append(dict(kernel=name, ms=float("nan"), tflops=float("nan"), error=repr(e)[:200]))
    G._k_wgrad_into.configs, G._k_wgrad_into.cache = all_into, {}
    # the sum over a token's K = 6 slots (routed output, dx): memory-bound, so GB/s in place of TFLOP/s
    K = 6
    buf = torch.randn(M // K * K, H, device=x.device, dtype=x.dtype)
    moved = (buf.numel() + buf.numel() // K) * buf.element_size()
    for name, fn in (("slot sum (K=6), Triton", lambda: G.slot_sum(buf, M // K, K)),
                     ("slot sum (K=6), torch view.sum(1)", lambda: buf.view(M // K, K, H).sum(1))):
        ms = _bench(fn)
        res.append(dict(kernel=name, ms=ms, tflops=float("nan"), gbps=moved / ms / 1e6))
    # torch._grouped_mm for the same GEMMs (fwd shapes; the backward ones are transposes of these)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    for name, flops, fn in (
            ("grouped_mm gate_up", 2 * gemm, lambda: torch._grouped_mm(x, wgu, offs=offs)),
            ("grouped_mm down", gemm, lambda: torch._grouped_mm(h, wd, offs=offs)),
            ("grouped_mm dx (dgu Wgu^T)", 2 * gemm, lambda: torch._grouped_mm(dgu, wgu.transpose(-2, -1), offs=offs)),
            ("grouped_mm dh (dy Wd^T)", gemm, lambda: torch._grouped_mm(dy, wd.transpose(-2, -1), offs=offs)),
            ("grouped_mm dWgu (x^T dgu)", 2 * gemm, lambda: torch._grouped_mm(x.t(), dgu, offs=offs)),
            ("grouped_mm dWd (h^T dy)", gemm, lambda: torch._grouped_mm(h.t(), dy, offs=offs))):
        try:
            ms = _bench(fn)
            res.append(dict(kernel=name, ms=ms, tflops=flops / ms / 1e9))
        except Exception as e:  # noqa: BLE001
            res.append(dict(kernel=name, ms=float("nan"), tflops=float("nan"), error=repr(e)[:200]))
    return res


def profile_step(fn, d, steps=5):
    """Device time per kernel inside the real fwd+bwd step (torch.profiler), ms per step."""
    from torch.profiler import ProfilerActivity, profile
    x, counts, wgu, wd, dy = d["x"], d["counts"], d["wgu"], d["wd"], d["dy"]
    xs, g, w = (t.detach().requires_grad_() for t in (x, wgu, wd))

    def step():
        out = fn(xs, counts, g, w)
        torch.autograd.grad(out, [xs, g, w], dy)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if t > 0:
            rows.append(dict(kernel=evt.key[:70], ms=t / 1e3 / steps, calls=evt.count / steps))
    rows.sort(key=lambda r: -r["ms"])
    return rows[:12]


def bench_routed(case, device, dtype, seed=1):
    """gather -> MLP -> weighted combine from token order (x [T, H], topk idx/weights)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    c = CASES[case]
    T, E, K = c["T"], c["E"], c["K"]
    x = torch.randn(T, H, generator=gen, device=device, dtype=dtype)
    idx = _routing(T, E, K, gen, device)
    w = torch.rand(T, K, generator=gen, device=device)
    wgu = torch.randn(E, H, 2 * I, generator=gen, device=device, dtype=dtype) / H ** 0.5
    wd = torch.randn(E, I, H, generator=gen, device=device, dtype=dtype) / I ** 0.5
    dy = torch.randn(T, H, generator=gen, device=device, dtype=dtype)
    res = {}
    for name, be in (("grouped_mm", GroupedMMBackend()), ("triton", get_backend("triton"))):
        with torch.no_grad():
            fwd = _bench(lambda: be.routed(x, idx, w, wgu, wd))
        xs, ws, g, d = (t.detach().requires_grad_() for t in (x, w, wgu, wd))

        def step():
            out = be.routed(xs, idx, ws, g, d)
            torch.autograd.grad(out, [xs, ws, g, d], dy)
        res[name] = (fwd, _bench(step))
    return T * K, res


def bench_layer(device, dtype, T=8192, with_hf=True):
    from moe.layer import Dots1MoE
    E, K, n_shared = 128, 6, 2
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(1, T, H, generator=gen, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    res = {}
    mods = {}
    for be in ("grouped_mm", "triton"):
        m = Dots1MoE(H, E, K, I, n_shared, 2.5, True, backend=be).to(device)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.normal_(0, 0.02, generator=gen)
        m.to(dtype)
        m.gate.float()
        mods["ours/" + be] = m
    if with_hf:
        from transformers import Dots1Config
        from transformers.models.dots1.modeling_dots1 import Dots1MoE as HFDots1MoE
        cfg = Dots1Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                          n_shared_experts=n_shared, routed_scaling_factor=2.5, n_group=1, topk_group=1,
                          norm_topk_prob=True, num_hidden_layers=1)
        cfg._experts_implementation = "eager"
        hf = HFDots1MoE(cfg).to(device)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                p.normal_(0, 0.02, generator=gen)
        mods["transformers Dots1MoE (eager)"] = hf.to(dtype)
    for name, m in mods.items():
        m.train()
        with torch.no_grad():
            fwd = _bench(lambda: m(x), ms_rep=400)
        xs = x.detach().requires_grad_()
        params = [p for p in m.parameters() if p.requires_grad]

        def step():
            out = m(xs)
            torch.autograd.grad(out, [xs, *params], dy, allow_unused=True)
        res[name] = (fwd, _bench(step, ms_rep=400))
    flops = 6.0 * T * H * I * (K + n_shared)  # routed + shared expert MLPs; router ignored
    return flops, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench/results/bench_experts.json")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--breakdown", action="store_true", help="per-kernel times of ours on each case")
    ap.add_argument("--no-layer", action="store_true")
    ap.add_argument("--no-loop", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    device, dtype = "cuda", torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    import transformers
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                python=platform.python_version(), argv=sys.argv, H=H, I=I, dtype=str(dtype))
    rows, extra = [], {}
    impls = [("loop", TorchLoopBackend().grouped_mlp), ("grouped_mm", GroupedMMBackend().grouped_mlp),
             ("triton", get_backend("triton").grouped_mlp), ("dense", dense_mlp)]
    for case in args.cases.split(","):
        d = make_grouped(case, device, dtype)
        fl = 6.0 * d["M"] * H * I
        for name, fn in impls:
            if name == "loop" and args.no_loop:
                continue
            fwd, fb = time_grouped(fn, d)
            rows.append(dict(case=case, impl=name, M=d["M"], E=d["E"], fwd_ms=fwd, fwd_tflops=fl / fwd / 1e9,
                             fwdbwd_ms=fb, fwdbwd_tflops=3 * fl / fb / 1e9))
            print(f"{case:6s} {name:12s} fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms", flush=True)
        err = rel_errors(get_backend("triton").grouped_mlp, GroupedMMBackend().grouped_mlp, d)
        extra.setdefault("triton_vs_grouped_mm_rel_err", {})[case] = err
        print(f"{case:6s} triton vs grouped_mm relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
        if args.breakdown:
            extra.setdefault("breakdown", {})[case] = breakdown(d)
            if case == "t8k":
                extra["profile"] = {n: profile_step(fn, d) for n, fn in impls if n in ("grouped_mm", "triton")}
        del d
        torch.cuda.empty_cache()
    M, r = bench_routed("t8k", device, dtype)
    fl = 6.0 * M * H * I
    for name, (fwd, fb) in r.items():
        rows.append(dict(case="t8k routed", impl=name, M=M, E=128, fwd_ms=fwd, fwd_tflops=fl / fwd / 1e9,
                         fwdbwd_ms=fb, fwdbwd_tflops=3 * fl / fb / 1e9))
    torch.cuda.empty_cache()
    if not args.no_layer:
        fl, r = bench_layer(device, dtype, with_hf=not args.no_hf)
        for name, (fwd, fb) in r.items():
            rows.append(dict(case="MoE layer 8k", impl=name, M=8192, E=128, fwd_ms=fwd, fwd_tflops=fl / fwd / 1e9,
                             fwdbwd_ms=fb, fwdbwd_tflops=3 * fl / fb / 1e9))
    try:  # chosen autotune configurations
        from moe.kernels import grouped as G
        extra["autotune"] = {n: {str(k): str(v) for k, v in getattr(k_, "cache", {}).items()}
                             for n, k_ in (("gate_up", G._k_gate_up), ("rows", G._k_rows),
                                           ("down_bwd", G._k_down_bwd), ("wgrad", G._k_wgrad))}
    except Exception as e:  # noqa: BLE001
        extra["autotune"] = repr(e)
    summary = {}
    for r_ in rows:
        summary.setdefault(r_["case"], {})[r_["impl"]] = dict(fwd_ms=r_["fwd_ms"], fwdbwd_ms=r_["fwdbwd_ms"])
    for case, impls_ in summary.items():
        base = impls_.get("grouped_mm") or impls_.get("ours/grouped_mm")
        tri = impls_.get("triton") or impls_.get("ours/triton")
        if base and tri:
            impls_["triton_vs_grouped_mm_fwd"] = base["fwd_ms"] / tri["fwd_ms"]
            impls_["triton_vs_grouped_mm_fwdbwd"] = base["fwdbwd_ms"] / tri["fwdbwd_ms"]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, summary=summary, rows=rows, **extra), f, indent=1)

    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"transformers {meta['transformers']} | {meta['date']}")
    print(f"{'case':14s} {'impl':30s} {'rows':>7s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'f+b ms':>9s} {'TFLOP/s':>8s} "
          f"{'fwd vs gmm':>10s} {'f+b vs gmm':>10s}")
    ref = {(r_["case"], r_["impl"]): r_ for r_ in rows}
    for r_ in rows:
        base = ref.get((r_["case"], "grouped_mm")) or ref.get((r_["case"], "ours/grouped_mm"))
        sf = f"{base['fwd_ms'] / r_['fwd_ms']:9.2f}x" if base else ""
        sp = f"{base['fwdbwd_ms'] / r_['fwdbwd_ms']:9.2f}x" if base else ""
        print(f"{r_['case']:14s} {r_['impl']:30s} {r_['M']:7d} {r_['fwd_ms']:9.3f} {r_['fwd_tflops']:8.1f} "
              f"{r_['fwdbwd_ms']:9.3f} {r_['fwdbwd_tflops']:8.1f} {sf:>10s} {sp:>10s}")
    for case, br in extra.get("breakdown", {}).items():
        print(f"\nper-kernel ({case}):")
        for b in br:
            rate = f"{b['gbps']:7.0f} GB/s" if "gbps" in b else f"{b['tflops']:7.1f} TFLOP/s"
            print(f"  {b['kernel']:36s} {b['ms']:8.3f} ms {rate}")
    for impl, prof in extra.get("profile", {}).items():
        print(f"\nprofiled fwd+bwd step, t8k, {impl} (device ms per step, top kernels):")
        for p_ in prof:
            print(f"  {p_['ms']:8.3f} ms  x{p_['calls']:.0f}  {p_['kernel']}")
    if isinstance(extra.get("autotune"), dict):
        print("\nautotune:")
        for n, cache in extra["autotune"].items():
            for k, v in cache.items():
                print(f"  {n}: {k} -> {v}")


if __name__ == "__main__":
    main()
