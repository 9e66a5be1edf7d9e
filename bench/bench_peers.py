"""Our dots1 MoE layer against the peers' MoE layers: same shapes, same weights, same routing, one process.

Peers (optional imports; NOT dependencies of this package; their code is never copied here):
- torchtitan 0.3.0: `torchtitan.models.common.moe.MoE` (TokenChoiceTopKRouter + LocalTokenDispatcher +
  GroupedExperts, three torch._grouped_mm calls, shared FeedForward);
- OLMo-core 3.0.0: `olmo_core.nn.moe.moe.DroplessMoE` (MoELinearRouter + ParallelDroplessMLP over
  DroplessMoEMLP, shared FeedForward). Its expert GEMMs go through the `grouped_gemm` package when that is
  installed, else a per-expert loop (its own fallback; one host sync per layer). Where `grouped_gemm` is
  missing we also time the same layer with that `_gmm` seam filled by torch._grouped_mm (a second row).
Megatron-Core and Transformer Engine are not tried: no wheel of either installs without a CUDA build.

Configuration to dots1's math (moe/layer.py, shared/dots1.md): sigmoid scores in fp32, top-k chosen on
scores + e_score_correction_bias, weights = the unbiased scores of the chosen experts, normalized to sum 1,
x routed_scaling_factor (2.5), output = routed + shared. How each peer is made to compute that:
- torchtitan: score_func="sigmoid", route_norm=True, route_scale=2.5, load_balance_coeff set (so its
  expert_bias_E buffer exists and takes our bias), router gate kept fp32. Same math, except that its
  GroupedExperts casts activations and weights to bf16 always (even in an fp32 run), so in fp32 its
  tolerance is bf16's.
- OLMo-core: gating_function=sigmoid, normalize_expert_weights=1 (L1, = sum for positive scores),
  bias_gamma set (so score_bias exists and takes our bias), router dtype fp32. It adds 1e-7 to every
  score, has no routed scale, and combines shared + routed as (shared + K*routed)/(K+1): we compensate by
  scaling the copied down projections (routed x 2.5*(K+1)/K, shared x (K+1)), which makes the layer the
  same function of x (the weight gradients of those two matrices are then scaled, the input gradient is
  not). On CPU its Triton gather/scatter (CUDA only) are replaced by a torch gather/scatter of the same
  permutation (`_olmo_cpu_permute_and_compute`); router, experts, shared MLP and combine stay theirs.
  Its `gmm` casts x and weights to bf16 whenever the `_gmm` seam is set (grouped_gemm is bf16 only), so
  the torch._grouped_mm row has bf16 tolerance in fp32 runs; the per-expert loop computes in --dtype.
Weights: one fp32 set in the checkpoint's per-expert layout (router [E, H], bias [E], gate/up [E, I, H],
down [E, H, I], shared gate/up [S, H], down [H, S] with S = shared * I) is copied into every layer, then
cast to --dtype (routers stay fp32: ours by policy, the peers by configuration). The router bias is random
(not zero), so selection by score + bias differs from selection by score and the check covers it.

Check (first iteration, before timing): the same x and output gradient go through every layer; for each
peer we print max|out - ours| / max|ours| and the same for dx (input gradient), and the fraction of tokens
whose chosen expert set differs from ours (from the peers' own routers). Tolerance: fp32 1e-4; bf16, and
torchtitan and OLMo-core's _gmm row in fp32 (bf16 experts), 3e-2. A peer over tolerance is marked MISMATCH in the table (timed, not
hidden). Timing: forward + backward (torch.autograd.grad of x and every parameter), CUDA events per
iteration on GPU (time.perf_counter on CPU), median of --iters after --warmup; --compile on wraps each
whole layer in torch.compile.

FLOPs of one layer (matmuls only), T tokens, hidden H, E experts, top-k K, expert width I, S = shared*I:
    forward = 6*T*K*H*I  (routed: gate, up, down; 2*H*I each per routed row)
            + 6*T*H*S    (shared SwiGLU)
            + 2*T*H*E    (router logits)
    forward + backward = 3 * forward
Ratio column: the best peer's f+b ms / this row's f+b ms (> 1 = faster than the best peer).

Run (device; peers are wheels, --no-deps, into a target dir on PYTHONPATH):
    pip download --no-deps --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \
        -d wheels torchtitan==0.3.0 ai2-olmo-core==3.0.0 spmd_types==0.2.3 tyro==1.0.17 \
        docstring-parser==0.18.0 typeguard==4.6.1 dataclass-extensions==0.5.0
    pip install --no-deps --target /tmp/peersite wheels/*.whl
    PYTHONPATH=/tmp/peersite:$PWD python bench/bench_peers.py --compile on --json bench/results/bench_peers.json
    PYTHONPATH=/tmp/peersite:$PWD python bench/bench_peers.py --device cpu --dtype float32 --tokens 256 \
        --hidden 64 --intermediate 32 --experts 8 --top-k 2 --compile off
Why those wheels: torchtitan.models.common.moe imports spmd_types, and (through torchtitan.distributed ->
torchtitan.config.manager) tyro, which needs docstring-parser and typeguard; olmo_core.nn.moe.moe imports olmo_core.config,
which needs dataclass-extensions and `cached_path`. cached-path would pull boto3 and google-cloud-storage
(about 15 wheels) for a function olmo_core.config only calls to read remote config files, so when it is
missing a placeholder module `cached_path` is registered before the import (`_import_olmo`); and
olmo_core/nn/__init__.py imports the whole transformer/data stack (cached_path.schemes, ...), so the
packages olmo_core.nn and olmo_core.nn.moe are registered bare (their __init__ skipped) and the submodules
olmo_core.nn.moe.moe / .router / olmo_core.nn.feed_forward are imported directly.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe.layer import Dots1MoE  # noqa: E402

ROUTED_SCALE = 2.5
PEERS = ("torchtitan", "olmo-core")
TOL = {"float32": 1e-4, "bfloat16": 3e-2}


# ---------------------------------------------------------------- FLOPs, weights

def layer_flops(tokens: int, hidden: int, experts: int, top_k: int, intermediate: int, shared: int) -> dict:
    """Matmul FLOPs of one layer (see the module docstring): forward and forward + backward."""
    fwd = (6 * tokens * top_k * hidden * intermediate + 6 * tokens * hidden * shared * intermediate
           + 2 * tokens * hidden * experts)
    return dict(fwd=fwd, fwdbwd=3 * fwd)


def make_weights(a, device, seed: int = 0) -> dict:
    """One fp32 weight set in the checkpoint's per-expert layout ([out, in] matrices)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    H, E, I, S = a.hidden, a.experts, a.intermediate, a.shared * a.intermediate

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(device)
    return dict(router=rnd(E, H, std=H ** -0.5), bias=rnd(E, std=0.05),
                gate=rnd(E, I, H, std=H ** -0.5), up=rnd(E, I, H, std=H ** -0.5), down=rnd(E, H, I, std=I ** -0.5),
                s_gate=rnd(S, H, std=H ** -0.5), s_up=rnd(S, H, std=H ** -0.5), s_down=rnd(H, S, std=S ** -0.5))


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.reshape(p.shape).to(p.dtype))


# ---------------------------------------------------------------- ours

def build_ours(a, w: dict, backend: str, dtype, device) -> torch.nn.Module:
    m = Dots1MoE(a.hidden, a.experts, a.top_k, a.intermediate, a.shared, ROUTED_SCALE, True, backend=backend)
    m.to(device=device, dtype=dtype)
    m.gate.float()  # the router stays fp32 (our mixed-precision policy)
    _set(m.gate.weight, w["router"])
    _set(m.gate.e_score_correction_bias, w["bias"])
    _set(m.experts.w_gate_up, torch.cat([w["gate"].transpose(1, 2), w["up"].transpose(1, 2)], dim=2))
    _set(m.experts.w_down, w["down"].transpose(1, 2))
    if m.shared_experts is not None:
        _set(m.shared_experts.gate_proj.weight, w["s_gate"])
        _set(m.shared_experts.up_proj.weight, w["s_up"])
        _set(m.shared_experts.down_proj.weight, w["s_down"])
    return m


def ours_routing(m, x2d: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.gate(x2d)[0]


# ---------------------------------------------------------------- torchtitan

def _import_torchtitan():
    return importlib.import_module("torchtitan.models.common.moe")


def build_torchtitan(a, w: dict, dtype, device):
    tt = _import_torchtitan()
    from torchtitan.models.common.feed_forward import FeedForward
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
    H, E, K, I, S = a.hidden, a.experts, a.top_k, a.intermediate, a.shared * a.intermediate
    cfg = tt.MoE.Config(
        num_experts=E,
        routed_experts=tt.RoutedExperts.Config(
            inner_experts=tt.GroupedExperts.Config(dim=H, hidden_dim=I, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K)),
        router=tt.TokenChoiceTopKRouter.Config(num_experts=E, gate=Linear.Config(in_features=H, out_features=E),
                                               top_k=K, score_func="sigmoid", route_norm=True,
                                               route_scale=ROUTED_SCALE),
        load_balance_coeff=1e-3,
        shared_experts=(FeedForward.Config(w1=Linear.Config(in_features=H, out_features=S),
                                           w2=Linear.Config(in_features=S, out_features=H),
                                           w3=Linear.Config(in_features=H, out_features=S)) if S else None))
    m = cfg.build()
    m.to(device=device, dtype=dtype)
    m.router.float()
    m.expert_bias_E = m.expert_bias_E.float()
    m.tokens_per_expert_E = m.tokens_per_expert_E.float()
    _set(m.router.gate.weight, w["router"])
    _set(m.expert_bias_E, w["bias"])
    ex = m.routed_experts.inner_experts
    _set(ex.w1_EFD, w["gate"])
    _set(ex.w3_EFD, w["up"])
    _set(ex.w2_EDF, w["down"])
    if S:
        _set(m.shared_experts.w1.weight, w["s_gate"])
        _set(m.shared_experts.w3.weight, w["s_up"])
        _set(m.shared_experts.w2.weight, w["s_down"])
    return m


def torchtitan_routing(m, x2d: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.router(x2d.unsqueeze(0), m.expert_bias_E)[1].reshape(x2d.shape[0], -1)


TORCHTITAN_DIFFERS = ("experts always bf16 (.bfloat16() on x and weights, even in fp32); router gate fp32 "
                      "(autocast fp32); combine: fp32 weight x row then scatter_add; same sigmoid/bias/"
                      "norm/scale; shared summed")


# ---------------------------------------------------------------- OLMo-core

def _import_olmo():
    """olmo_core.nn.moe.moe without olmo_core.nn's package __init__ (transformer/data stack) and, when
    the cached-path package is missing, with a placeholder `cached_path` (module docstring)."""
    if "olmo_core.nn.moe.moe" in sys.modules:
        return sys.modules["olmo_core.nn.moe.moe"]
    spec = importlib.util.find_spec("olmo_core")
    if spec is None:
        raise ModuleNotFoundError("No module named 'olmo_core'")
    try:
        importlib.import_module("cached_path")
    except ImportError:
        stub = types.ModuleType("cached_path")

        def cached_path(*_a, **_k):
            raise RuntimeError("cached_path placeholder (bench_peers): remote config files are not supported")
        stub.cached_path = cached_path
        sys.modules["cached_path"] = stub
    root = os.path.dirname(spec.origin)
    importlib.import_module("olmo_core")
    for name in ("olmo_core.nn", "olmo_core.nn.moe"):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
            pkg.__package__ = name
            sys.modules[name] = pkg
    return importlib.import_module("olmo_core.nn.moe.moe")


def _olmo_cpu_permute_and_compute(self, x, *, batch_size_per_expert, indices, bin_ids, expert_weights, bins,
                                  top_k):
    """OLMo-core's ParallelDroplessMLP.permute_and_compute with its Triton gather/scatter (CUDA only)
    replaced by torch indexing of the same permutation: row j of the grouped input is token
    indices[j] // top_k; the output of (token, slot) indices[j] is weight * row j, summed over slots."""
    x = x.view(-1, x.shape[-1])
    idx = indices.long()
    y = self.mlp(x.index_select(0, torch.div(idx, top_k, rounding_mode="floor")), batch_size_per_expert)
    y = y.to(x.dtype) * expert_weights.index_select(0, idx).unsqueeze(1).to(x.dtype)
    out = y.new_zeros(x.shape[0] * top_k, y.shape[1]).index_put((idx,), y)
    return out.view(x.shape[0], top_k, -1).sum(1)


def _torch_gmm(x, w, batch_sizes, trans_b=False):
    """grouped_gemm.ops.gmm's call signature on torch._grouped_mm (ours, for OLMo-core's `_gmm` seam)."""
    offs = torch.cumsum(batch_sizes.to(x.device), 0).to(torch.int32)
    return torch._grouped_mm(x, (w.transpose(1, 2) if trans_b else w).to(x.dtype), offs=offs)


def build_olmo(a, w: dict, dtype, device, gmm: str = "shipped"):
    om = _import_olmo()
    from olmo_core.config import DType
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.moe.router import MoERouterConfig, MoERouterGatingFunction
    H, E, K, I, S = a.hidden, a.experts, a.top_k, a.intermediate, a.shared * a.intermediate
    m = om.DroplessMoE(
        d_model=H, num_experts=E, hidden_size=I,
        router=MoERouterConfig(top_k=K, gating_function=MoERouterGatingFunction.sigmoid,
                               normalize_expert_weights=1.0, bias_gamma=1e-3, dtype=DType.float32),
        shared_mlp=FeedForwardConfig(hidden_size=S, bias=False) if S else None,
        init_device=str(device), dtype=torch.float32)
    m.to(device=device, dtype=dtype)
    m.router.float()
    _set(m.router.weight, w["router"])
    _set(m.router.score_bias, w["bias"])
    mlp = m.experts.mlp
    routed_comp = ROUTED_SCALE * (K + 1) / K  # their (shared + K*routed)/(K+1), no routed scale
    _set(mlp.w1, w["gate"])
    _set(mlp.w3, w["up"])
    _set(mlp.w2, w["down"].transpose(1, 2) * routed_comp)
    if S:
        _set(m.shared_mlp.w1.weight, w["s_gate"])
        _set(m.shared_mlp.w3.weight, w["s_up"])
        _set(m.shared_mlp.w2.weight, w["s_down"] * (K + 1))
    if torch.device(device).type != "cuda":
        m.experts.permute_and_compute = types.MethodType(_olmo_cpu_permute_and_compute, m.experts)
    if gmm == "torch._grouped_mm":
        mlp._gmm = _torch_gmm
    return m


def olmo_routing(m, x2d: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        was = m.router.training
        m.router.eval()  # no metric accumulation
        idx = m.router(x2d.unsqueeze(0))[1].reshape(x2d.shape[0], -1)
        m.router.train(was)
        return idx


OLMO_DIFFERS = ("scores sigmoid+1e-7; no routed scale; output (shared + K*routed)/(K+1) (compensated in the "
                "copied down projections); L1-normalized weights; router fp32; experts via grouped_gemm "
                "package or a per-expert loop (host sync, dynamo-disabled)")


# ---------------------------------------------------------------- check, timing

def _maxrel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _fwd_bwd(m, x, dy):
    xs = x.detach().requires_grad_()
    params = [p for p in m.parameters() if p.requires_grad]
    out = m(xs)
    grads = torch.autograd.grad(out, [xs, *params], dy, allow_unused=True)
    return out, grads[0]


def time_layer(step, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for dist in ("torchtitan", "ai2-olmo-core", "grouped_gemm", "megatron-core", "transformer_engine"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _print_table(rows: list[dict], meta: dict, flops: dict) -> None:
    head = ["implementation", "check", "out rel", "dx rel", "route diff", "f+b ms", "TFLOP/s", "vs best peer",
            "math differs"]
    cells = []
    for r in rows:
        def f(v, fmt):
            return "" if v is None else format(v, fmt)
        cells.append([r["impl"], r["check"], f(r.get("out_rel"), ".1e"), f(r.get("dx_rel"), ".1e"),
                      f(r.get("route_diff"), ".2%"), f(r.get("fwdbwd_ms"), ".3f"), f(r.get("tflops"), ".2f"),
                      f(r.get("vs_best_peer"), ".2f") + ("x" if r.get("vs_best_peer") is not None else ""),
                      r.get("differs", "")])
    title = (f"MoE layer f+b | {meta['device_name']} | torch {meta['torch']} | T={meta['args']['tokens']} "
             f"H={meta['args']['hidden']} E={meta['args']['experts']} K={meta['args']['top_k']} "
             f"I={meta['args']['intermediate']} shared={meta['args']['shared']} {meta['args']['dtype']} "
             f"compile={meta['args']['compile']} | {flops['fwdbwd'] / 1e9:.3f} GFLOP f+b")
    try:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=title, show_lines=False)
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i in (0, 1, 8) else "right", overflow="fold")
        for c in cells:
            t.add_row(*c)
        Console(width=max(160, Console().width)).print(t)
    except ImportError:
        print(title)
        print(" | ".join(head))
        for c in cells:
            print(" | ".join(c))


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--shared", type=int, default=2)
    ap.add_argument("--compile", choices=("on", "off"), default="on")
    ap.add_argument("--dtype", choices=("bf16", "bfloat16", "fp32", "float32"), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--backends", default=None,
                    help="our experts backends, comma list (default: grouped_mm,triton on CUDA, torch,grouped_mm on CPU)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {PEERS}, or 'none'")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(a.dtype, a.dtype)
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cuda = device.type == "cuda"
    if a.backends is None:
        a.backends = "grouped_mm,triton" if cuda else "torch" + (",grouped_mm" if hasattr(torch, "_grouped_mm") else "")
    peers = [] if a.peers in ("", "none") else [p.strip() for p in a.peers.split(",")]
    for p in peers:
        if p not in PEERS:
            raise SystemExit(f"--peers: unknown peer {p!r}; known: {PEERS}")
    flops = layer_flops(a.tokens, a.hidden, a.experts, a.top_k, a.intermediate, a.shared)
    w = make_weights(a, device, a.seed)
    g = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    x = torch.randn(1, a.tokens, a.hidden, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(1, a.tokens, a.hidden, generator=g).to(device=device, dtype=dtype)
    tol = TOL[a.dtype]

    # (name, kind, builder, routing fn, differs, tolerance)
    impls = [(f"ours Dots1MoE[{b}]", "ours", (lambda b=b: build_ours(a, w, b, dtype, device)), ours_routing,
              "reference (dots1: sigmoid fp32 router, bias for selection only, sum-normalized x 2.5, shared summed)",
              tol) for b in a.backends.split(",") if b]
    not_installed = []
    if "torchtitan" in peers:
        try:
            _import_torchtitan()
            impls.append(("torchtitan MoE", "peer", lambda: build_torchtitan(a, w, dtype, device),
                          torchtitan_routing, TORCHTITAN_DIFFERS, TOL["bfloat16"]))
        except ImportError as e:
            not_installed.append(("torchtitan MoE", f"not installed ({e})"))
    if "olmo-core" in peers:
        try:
            _import_olmo()
            have_gg = importlib.util.find_spec("grouped_gemm") is not None
            shipped = "grouped_gemm" if have_gg else "per-expert loop"
            impls.append((f"olmo-core DroplessMoE [{shipped}]", "peer", lambda: build_olmo(a, w, dtype, device),
                          olmo_routing, OLMO_DIFFERS, tol))
            if not have_gg and hasattr(torch, "_grouped_mm"):
                impls.append(("olmo-core DroplessMoE [_gmm=torch._grouped_mm]", "peer",
                              lambda: build_olmo(a, w, dtype, device, gmm="torch._grouped_mm"), olmo_routing,
                              OLMO_DIFFERS.replace("experts via grouped_gemm package or a per-expert loop (host "
                                                   "sync, dynamo-disabled)",
                                                   "experts: its gmm casts x and w to bf16 (even in fp32) and "
                                                   "calls its _gmm seam, given torch._grouped_mm (ours); "
                                                   "dynamo-disabled"), TOL["bfloat16"]))
        except ImportError as e:
            not_installed.append(("olmo-core DroplessMoE", f"not installed ({e})"))

    rows, ref, ref_idx = [], None, None
    x2d = x.reshape(-1, a.hidden)
    for name, kind, build, routing, differs, tol_i in impls:
        row = dict(impl=name, kind=kind, differs=differs, tol=tol_i)
        try:
            m = build()
            m.train()
            idx = routing(m, x2d).sort(-1).values
            out, dx = _fwd_bwd(m, x, dy)
            if ref is None:
                ref, ref_idx = (out.detach(), dx.detach()), idx
            row["out_rel"], row["dx_rel"] = _maxrel(out, ref[0]), _maxrel(dx, ref[1])
            row["route_diff"] = (idx != ref_idx).any(-1).float().mean().item()
            ok = row["out_rel"] <= tol_i and row["dx_rel"] <= tol_i and row["route_diff"] == 0.0
            row["check"] = ("ref" if len(rows) == 0 else ("ok" if ok else "MISMATCH")) + f" (tol {tol_i:g})"
            print(f"{name}: max rel diff vs ours out {row['out_rel']:.2e} dx {row['dx_rel']:.2e}, "
                  f"tokens routed differently {row['route_diff']:.2%} -> {row['check']}", flush=True)
            fm = torch.compile(m) if a.compile == "on" else m
            xs = x.detach().requires_grad_()
            params = [p for p in m.parameters() if p.requires_grad]

            def step(fm=fm, xs=xs, params=params):
                out = fm(xs)
                torch.autograd.grad(out, [xs, *params], dy, allow_unused=True)
            row["fwdbwd_ms"] = time_layer(step, device, a.warmup, a.iters)
            row["tflops"] = flops["fwdbwd"] / row["fwdbwd_ms"] / 1e9
            del m, fm
        except Exception as e:  # noqa: BLE001  (a peer that fails is a row, not a crash)
            row.setdefault("check", "error")
            row["error"] = repr(e)[:300]
            row["check"] = f"error: {repr(e)[:120]}"
            print(f"{name}: {row['error']}", flush=True)
        rows.append(row)
        if cuda:
            torch.cuda.empty_cache()
    for name, why in not_installed:
        rows.append(dict(impl=name, kind="peer", check=why, differs=""))
    peer_ms = [r["fwdbwd_ms"] for r in rows if r["kind"] == "peer" and r.get("fwdbwd_ms")]
    best_peer = min(peer_ms) if peer_ms else None
    for r in rows:
        r["vs_best_peer"] = best_peer / r["fwdbwd_ms"] if best_peer and r.get("fwdbwd_ms") else None
    ours_best = max((r["vs_best_peer"] for r in rows if r["kind"] == "ours" and r["vs_best_peer"]), default=None)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                device_name=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                torch=torch.__version__, python=platform.python_version(), argv=sys.argv if argv is None else argv,
                args=vars(a), peers=_peer_versions())
    result = dict(meta=meta, flops=flops, rows=rows, best_peer_ms=best_peer, ours_best_vs_best_peer=ours_best,
                  target="ours best >= 1.25x best peer (compiled, GPU)")
    _print_table(rows, meta, flops)
    if ours_best is not None:
        print(f"ours best vs best peer: {ours_best:.2f}x (target 1.25x)")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
