"""The `triton` experts backend against the float64 torch reference: forward and every gradient.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton is
imported; this module sets it when no CUDA device exists, but CI should export it) on small shapes,
through both load paths (the `path` fixture): TMA tensor descriptors with the persistent, flattened
tile loop (a few programs walking all tiles), pointer loads with one tile per program, and TMA with
64-wide column tiles and the dh epilogue in four column parts (EPI_SPLIT). Tests
marked `gpu` run the compiled kernels on larger bf16 shapes (TMA path; one case on pointer loads) and
fp32 (pointer loads), autotuned over two configurations of each kernel (persistent, with and without
the flattened loop; dh also with 256-wide tiles and the split epilogue; compiling every candidate for
every test shape takes minutes), and are skipped without CUDA.
Skipped entirely when Triton is not installed.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from moe.experts import GroupedExperts, TorchLoopBackend, available_backends, get_backend  # noqa: E402
from moe.kernels import grouped as G  # noqa: E402

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA and not G.INTERPRET,
                                reason="no CUDA and Triton was imported without TRITON_INTERPRET=1")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _routing(T, K, E, mode, gen):
    if mode == "random":
        return torch.rand(T, E, generator=gen).topk(K, -1).indices
    if mode == "one":  # one expert takes every row
        assert K == 1
        return torch.full((T, 1), E // 2, dtype=torch.long)
    if mode == "sparse":  # most experts empty (first and last included)
        allowed = torch.tensor([1, E // 2, E - 2])
        assert K <= len(allowed)
        pick = torch.rand(T, len(allowed), generator=gen).topk(K, -1).indices
        return allowed[pick]
    raise ValueError(mode)


def _case(T, K, E, H, I, mode="random", dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    idx = _routing(T, K, E, mode, gen)
    w = torch.rand(T, K, generator=gen) + 0.1
    wgu = torch.randn(E, H, 2 * I, generator=gen) / H ** 0.5
    wd = torch.randn(E, I, H, generator=gen) / I ** 0.5
    dy = torch.randn(T, H, generator=gen)
    return dict(x=x, idx=idx, w=w, wgu=wgu, wd=wd, dy=dy, dtype=dtype, device=device)


def _run(backend, c, dtype, device, routed=True):
    def leaf(t, dt):
        return t.to(device=device, dtype=dt).detach().requires_grad_()
    x, wgu, wd = leaf(c["x"], dtype), leaf(c["wgu"], dtype), leaf(c["wd"], dtype)
    w = leaf(c["w"], torch.float32 if dtype != torch.float64 else dtype)
    idx = c["idx"].to(device)
    out = backend.routed(x, idx, w, wgu, wd)
    grads = torch.autograd.grad(out, [x, w, wgu, wd], c["dy"].to(device=device, dtype=out.dtype))
    return [t.double().cpu() for t in (out, *grads)]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


NAMES = ["out", "dx", "dw", "dWgu", "dWd"]

PATHS = {  # acc: how the weight-gradient kernels add into fp32 accumulators; epi: epilogue column parts
    "tma-persistent": dict(tma=True, interp=dict(PERSIST=1, FLATTEN=True), epi=1, acc=G.ACC_READ, wepi=1),
    "pointer-tile": dict(tma=False, interp=dict(PERSIST=0, FLATTEN=False), epi=1, acc=G.ACC_ATOMIC, wepi=1),
    "tma-epilogue-split": dict(tma=True, interp=dict(PERSIST=1, FLATTEN=False, BLOCK_N=64), epi=4, acc=G.ACC_READ,
                               wepi=2),
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """Kernel load path: TMA descriptors or pointer loads (and, under the interpreter, the tile loop)."""
    p = PATHS[request.param]
    monkeypatch.setattr(G, "USE_TMA", p["tma"])
    monkeypatch.setattr(G, "_INTERP", {**G._INTERP, **p["interp"]})
    monkeypatch.setattr(G, "_INTERP_DOWN_BWD", {"EPI_SPLIT": p["epi"]})
    monkeypatch.setattr(G, "_INTERP_WGRAD", {"ACC_MODE": p["acc"], "EPI_SPLIT": p["wepi"]})
    return request.param


def _check(c, dtype=torch.float32, device="cpu", tol=None):
    ours = _run(get_backend("triton"), c, dtype, device)
    ref = _run(TorchLoopBackend(), c, torch.float64, "cpu")
    base = _run(TorchLoopBackend(), c, dtype, device) if dtype != torch.float32 else None
    for name, a, r, *b in zip(NAMES, ours, ref, *( [base] if base else [])):
        assert torch.isfinite(a).all(), name
        err = _rel(a, r)
        if base:  # low precision: no worse than twice the torch loop at that precision (plus slack);
            # the interpreter converts fp32 -> bf16 by truncation (twice the rounding error): 4x there
            limit = (4 if G.INTERPRET else 2) * _rel(b[0], r) + 2e-3
        else:
            limit = tol or 1e-4  # interpreter dots are exact fp32; compiled fp32 dots use tf32
        assert err < limit, f"{name}: rel err {err:.3g} >= {limit:.3g}"


# ------------------------------------------------------------------------------------- CPU / any

def test_registered():
    assert "triton" in available_backends()
    assert get_backend("triton").name == "triton"


@pytest.mark.parametrize("T,K,E,H,I,mode", [
    (13, 3, 6, 40, 24, "random"),   # odd rows, H and I not multiples of the tile
    (9, 1, 5, 32, 16, "one"),       # one expert takes every row, the others empty
    (11, 2, 8, 32, 32, "sparse"),   # most experts empty, first and last included
    (37, 1, 3, 48, 40, "one"),      # several full row chunks per expert + a partial one
    (48, 1, 3, 32, 16, "one"),      # row count a multiple of the tile: no partial chunk
])
def test_routed_fp32(T, K, E, H, I, mode, path):
    _check(_case(T, K, E, H, I, mode), tol=1e-4 if G.INTERPRET else 5e-3)


def test_routed_bf16(path):
    _check(_case(17, 2, 4, 32, 32, seed=3), dtype=torch.bfloat16)


def test_grouped_mlp_with_empty_experts(path):
    gen = torch.Generator().manual_seed(5)
    E, H, I = 5, 32, 24
    counts = torch.tensor([0, 7, 0, 3, 0])
    x = torch.randn(int(counts.sum()), H, generator=gen)
    wgu = torch.randn(E, H, 2 * I, generator=gen) / H ** 0.5
    wd = torch.randn(E, I, H, generator=gen) / I ** 0.5
    dy = torch.randn(x.shape[0], H, generator=gen)
    res = []
    for be, dt in ((get_backend("triton"), torch.float32), (TorchLoopBackend(), torch.float64)):
        xs, g, d = (t.to(dt).requires_grad_() for t in (x, wgu, wd))
        out = be.grouped_mlp(xs, counts, g, d)
        res.append([t.double() for t in (out, *torch.autograd.grad(out, [xs, g, d], dy.to(dt)))])
    for name, a, r in zip(["out", "dx", "dWgu", "dWd"], *res):
        assert _rel(a, r) < 1e-4, name
    assert (res[0][2][0] == 0).all() and (res[0][3][2] == 0).all()  # empty experts: zero gradients


def test_no_tokens(path):
    c = _case(0, 2, 4, 16, 16)
    ours = _run(get_backend("triton"), c, torch.float32, "cpu")
    assert ours[0].shape == (0, 16)
    assert (ours[3] == 0).all() and (ours[4] == 0).all()


@pytest.mark.parametrize("routed", [True, False])
def test_weight_gradients_add_into_fp32_accumulators(path, routed):
    """With accumulators (`wgrad_into`), the weight-gradient kernels add into them in their epilogue
    and the weights get no `.grad`: after three micro-batches, all forwards run before any backward
    (two in flight, as in the paired schedule), each accumulator holds its start value plus the
    three gradients (fp32 operands: exact fp32 dots under the interpreter; tf32 compiled)."""
    be, dev = get_backend("triton"), "cuda" if CUDA else "cpu"
    c = _case(13, 2, 5, 32, 24, seed=11)
    wgu, wd = c["wgu"].to(dev).requires_grad_(), c["wd"].to(dev).requires_grad_()
    start_gu, start_d = torch.randn(wgu.shape), torch.randn(wd.shape)
    acc_gu, acc_d = start_gu.to(dev), start_d.to(dev)
    want_gu, want_d = start_gu.double(), start_d.double()
    outs = []
    for seed in range(3):
        m = _case(13, 2, 5, 32, 24, seed=20 + seed)
        x, idx, w = m["x"], m["idx"], m["w"]
        counts = torch.bincount(idx[:, 0], minlength=5)
        if not routed:
            x = x[torch.argsort(idx[:, 0], stable=True)]
        xd = x.to(dev).requires_grad_()
        out = (be.routed(xd, idx.to(dev), w.to(dev), wgu, wd, wgrad_into=(acc_gu, acc_d)) if routed else
               be.grouped_mlp(xd, counts.to(dev), wgu, wd, wgrad_into=(acc_gu, acc_d)))
        outs.append((out, m["dy"][:out.shape[0]].to(dev)))
        g64, d64 = (t.detach().cpu().double().requires_grad_() for t in (wgu, wd))
        ref = (TorchLoopBackend().routed(x.double(), idx, w.double(), g64, d64) if routed else
               TorchLoopBackend().grouped_mlp(x.double(), counts, g64, d64))
        ref.backward(m["dy"][:ref.shape[0]].double())
        want_gu, want_d = want_gu + g64.grad, want_d + d64.grad
    for out, dy in outs:
        out.backward(dy)
    assert wgu.grad is None and wd.grad is None
    for acc, want in ((acc_gu, want_gu), (acc_d, want_d)):
        assert _rel(acc.double().cpu(), want) < (1e-5 if G.INTERPRET else 5e-3)


def test_accumulators_are_skipped_without_an_input_gradient():
    """An input that needs no gradient leaves the backward nothing to return: the weights then get
    their `.grad` as usual and the accumulators stay untouched (moe.wgrad)."""
    dev = "cuda" if CUDA else "cpu"
    c = _case(9, 2, 4, 32, 16, seed=2)
    wgu, wd = c["wgu"].to(dev).requires_grad_(), c["wd"].to(dev).requires_grad_()
    acc_gu, acc_d = torch.zeros_like(wgu), torch.zeros_like(wd)
    out = get_backend("triton").routed(c["x"].to(dev), c["idx"].to(dev), c["w"].to(dev), wgu, wd,
                                       wgrad_into=(acc_gu, acc_d))
    out.backward(c["dy"].to(dev))
    assert wgu.grad is not None and wd.grad is not None
    assert acc_gu.abs().sum() == 0 and acc_d.abs().sum() == 0


def test_grouped_experts_module():
    torch.manual_seed(0)
    m = GroupedExperts(4, 32, 16, backend="triton")
    torch.nn.init.normal_(m.w_gate_up, std=0.1)
    torch.nn.init.normal_(m.w_down, std=0.1)
    x = torch.randn(6, 32)
    idx = torch.rand(6, 4).topk(2, -1).indices
    w = torch.rand(6, 2)
    out = m(x, idx, w)
    out.sum().backward()
    ref = TorchLoopBackend().routed(x, idx, w, m.w_gate_up, m.w_down)
    assert _rel(out.double(), ref.double()) < 1e-4
    assert m.w_gate_up.grad is not None and m.w_down.grad is not None


# ------------------------------------------------------------------------------------- GPU only

@pytest.fixture(autouse=True)
def _two_configs(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is None or not CUDA:
        return
    for k, pick in ((G._k_gate_up, [0, 1]), (G._k_rows, [0, 1]), (G._k_down_bwd, [0, 2]), (G._k_wgrad, [0, 1]),
                    (G._k_wgrad_into, [0, 1, 2])):
        monkeypatch.setattr(k, "configs", [k.configs[i] for i in pick])


@gpu
@needs_cuda
@pytest.mark.parametrize("T,K,E,H,I,mode", [
    (1000, 6, 32, 512, 384, "random"),
    (333, 1, 8, 256, 192, "one"),
    (517, 3, 16, 256, 320, "sparse"),
    (2048, 6, 128, 1024, 176, "random"),
])
def test_gpu_bf16(T, K, E, H, I, mode):
    _check(_case(T, K, E, H, I, mode), dtype=torch.bfloat16, device="cuda")


@gpu
@needs_cuda
def test_gpu_bf16_pointer_loads(monkeypatch):
    monkeypatch.setattr(G, "USE_TMA", False)
    _check(_case(517, 3, 16, 256, 320, "random"), dtype=torch.bfloat16, device="cuda")


@gpu
@needs_cuda
def test_gpu_grouped_mlp_bf16():
    """Unweighted grouped rows (the bench's GEMM-only path): TMA for activations too."""
    gen = torch.Generator().manual_seed(7)
    E, H, I = 8, 512, 320
    counts = torch.tensor([300, 0, 129, 1, 640, 0, 0, 77])
    x = torch.randn(int(counts.sum()), H, generator=gen)
    wgu = torch.randn(E, H, 2 * I, generator=gen) / H ** 0.5
    wd = torch.randn(E, I, H, generator=gen) / I ** 0.5
    dy = torch.randn(x.shape[0], H, generator=gen)
    res = []
    for be, dt, dev in ((get_backend("triton"), torch.bfloat16, "cuda"), (TorchLoopBackend(), torch.float64, "cpu"),
                        (TorchLoopBackend(), torch.bfloat16, "cuda")):
        xs, g, d = (t.to(dev, dt).requires_grad_() for t in (x, wgu, wd))
        out = be.grouped_mlp(xs, counts.to(dev), g, d)
        res.append([t.double().cpu() for t in (out, *torch.autograd.grad(out, [xs, g, d], dy.to(dev, dt)))])
    for name, a, r, b in zip(["out", "dx", "dWgu", "dWd"], *res):
        assert _rel(a, r) < 2 * _rel(b, r) + 2e-3, name


def _accumulate_two_micro_batches(monkeypatch, mode):
    """(start values, the fp32 accumulators after two micro-batches' routed backward through the
    first accumulating config of `mode` alone, the fp64 sums of the torch loop's bf16 gradients)."""
    one = [c for c in G._WGRAD_INTO_CONFIGS if c.kwargs["ACC_MODE"] == mode][:1]
    monkeypatch.setattr(G._k_wgrad_into, "configs", one)
    monkeypatch.setattr(G._k_wgrad_into, "cache", {})  # the autotuner's choice per key, kept per process
    be = get_backend("triton")
    c = _case(1000, 6, 16, 512, 384, seed=5)
    wgu, wd = (c[k].cuda().bfloat16().requires_grad_() for k in ("wgu", "wd"))
    gen = torch.Generator(device="cuda").manual_seed(9)
    start = [torch.randn(wgu.shape, device="cuda", generator=gen), torch.randn(wd.shape, device="cuda", generator=gen)]
    acc = [t.clone() for t in start]
    assert all(G._tma_reduce_ok(a) for a in acc) == G._HAS_DESCRIPTOR_REDUCE
    want = [t.double() for t in start]
    for seed in (1, 2):
        m = _case(1000, 6, 16, 512, 384, seed=seed)
        x = m["x"].cuda().bfloat16().requires_grad_()
        be.routed(x, m["idx"].cuda(), m["w"].cuda(), wgu, wd, wgrad_into=tuple(acc)).backward(m["dy"].cuda().bfloat16())
        g, d = (t.detach().clone().requires_grad_() for t in (wgu, wd))
        TorchLoopBackend().routed(x.detach(), m["idx"].cuda(), m["w"].cuda(), g, d).backward(m["dy"].cuda().bfloat16())
        want = [want[0] + g.grad.double(), want[1] + d.grad.double()]
    return start, acc, want


@gpu
@needs_cuda
def test_gpu_bf16_accumulating_epilogues(monkeypatch):
    """Each accumulating epilogue alone (the autotuner picks one): read-add-write, atomic adds and the
    TMA reduce. The fp32 accumulator ends as its start value plus the two micro-batches' weight
    gradients, within bf16 rounding of the torch loop's; and as each element gets one add per launch,
    the three epilogues (same tiles) end bit for bit equal."""
    modes = [G.ACC_READ, G.ACC_ATOMIC] + ([G.ACC_TMA] if G._HAS_DESCRIPTOR_REDUCE else [])
    results = {mode: _accumulate_two_micro_batches(monkeypatch, mode) for mode in modes}
    start, acc, want = results[G.ACC_READ]
    for a, w0, w in zip(acc, start, want):
        assert _rel((a.double() - w0.double()).cpu(), (w - w0.double()).cpu()) < 2e-2
    for mode in modes[1:]:
        for a, b in zip(results[mode][1], acc):
            assert torch.equal(a, b), f"ACC_MODE {mode} differs from read-add-write"


@gpu
@needs_cuda
def test_gpu_fp32():
    _check(_case(300, 4, 8, 256, 128), dtype=torch.float32, device="cuda", tol=5e-3)
