"""Gradient-accumulation fusion (anneal.model.grad_fusion): the dense weight-gradient GEMMs add into
the fp32 accumulators directly. Checked against fp64 gradients, against the hook path it replaces,
under torch.compile, and under selective recompute. CPU runs the op's CPU twin (fp32 product of the
bf16 operands); the CUDA path (cuBLAS bf16 -> fp32 with beta = 1) is tested on the device."""
import pytest
import torch
import torch.nn.functional as F

from anneal.model.grad_fusion import FusedWgradLinear, fused_wgrad_linear
from anneal.model.precision import PrecisionPolicy
from anneal.model.recompute import keeps_output
from anneal.train.engine import Engine
from anneal.train.step import accumulate, token_losses
from test_precision import CFG, _batches, _model, _tcfg

FUSED = PrecisionPolicy(torch.bfloat16, torch.float32, grad_accum_fusion=True)
HOOK = PrecisionPolicy(torch.bfloat16, torch.float32)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_op_accumulates_the_weight_gradient_over_micro_batches_like_fp64(device):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen).to(device, torch.bfloat16).requires_grad_()
    acc = torch.zeros(48, 64, device=device)
    ref = torch.zeros(48, 64, dtype=torch.float64, device=device)
    for _ in range(8):
        x = torch.randn(3, 40, 64, generator=gen).to(device, torch.bfloat16).requires_grad_()
        dy = torch.randn(3, 40, 48, generator=gen).to(device, torch.bfloat16)
        y = fused_wgrad_linear(x, w, acc)
        torch.testing.assert_close(y, F.linear(x, w))
        y.backward(dy)
        ref += dy.double().flatten(0, 1).t() @ x.double().flatten(0, 1)
        torch.testing.assert_close(x.grad, (dy @ w).detach())     # the input gradient is the plain one
    assert w.grad is None                                           # nothing went the bf16 way
    assert acc.dtype == torch.float32
    # fp32 sums of exact bf16 products: within fp32 rounding of the fp64 sum (bf16 rounding would be ~1e-2)
    torch.testing.assert_close(acc.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_micro_batches_in_flight_together_each_add_their_gradient(backend):
    """The paired schedule runs micro-batch i+1's forward before micro-batch i's backward: each
    backward must add into the accumulator that the other's forward also saved (a declared in-place
    update failed autograd's saved-tensor version check there, eager and compiled)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    acc = torch.zeros(24, 32)
    layer = lambda x: torch.relu(fused_wgrad_linear(x, w, acc)) * 2
    layer = torch.compile(layer, backend=backend) if backend else layer
    xs = [torch.randn(5, 32, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(3)]
    outs = [layer(x) for x in xs]                      # three forwards in flight
    for y in reversed(outs):
        y.float().sum().backward()
    ref = torch.zeros(24, 32, dtype=torch.float64)
    for x in xs:
        w64, x64 = w.detach().double().requires_grad_(), x.detach().double()
        (torch.relu(x64 @ w64.t()) * 2).sum().backward()
        ref += w64.grad
    assert w.grad is None
    torch.testing.assert_close(acc.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _accumulated(policy, n_micro=4, compile_backend=None, recompute="none", backend="torch"):
    model = _model(backend)
    model.recompute = recompute
    engine = Engine(model, _tcfg(), policy)
    if compile_backend:
        model.compile_layers(backend=compile_backend)
    accumulate(model, engine, iter(_batches(n_micro)), n_micro, 1, torch.device("cpu"))
    return model, engine, {n: m.grad.clone() for n, m in zip(engine.masters.names, engine.masters.masters)}


def _reference_fp64(n_micro=4):
    """The same micro-batches' summed gradients of the bf16-rounded weights, computed in fp64."""
    model = _model("torch").to_dtype(torch.bfloat16).double()   # the compute weights, in fp64
    for b in _batches(n_micro):
        (token_losses(model, b).mean() / n_micro).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


N_DENSE_FUSED = 1 + CFG["num_hidden_layers"] * 4 + 3 + 3 * (CFG["num_hidden_layers"] - 1)


def test_fused_step_sums_gradients_at_least_as_accurately_as_the_hook():
    """Dense layers with the `torch` experts backend (the routed experts keep the hook); the `triton`
    experts' fused step is checked compiled below (Triton's interpreter makes an eager twin of it a
    minute long) and its kernels against fp64 in tests/test_triton_experts.py."""
    _, eng_f, fused = _accumulated(FUSED)
    _, _, hooked = _accumulated(HOOK)
    assert len(eng_f.masters.fused) == N_DENSE_FUSED
    ref = _reference_fp64()
    fused_names = {n for n, p in zip(eng_f.masters.names, eng_f.masters.params) if any(p is f for f in eng_f.masters.fused)}
    assert "lm_head.weight" in fused_names and "model.layers.0.self_attn.q_proj.weight" in fused_names
    for name in fused_names:
        err_f = (fused[name].double() - ref[name]).norm() / ref[name].norm()
        err_h = (hooked[name].double() - ref[name]).norm() / ref[name].norm()
        assert err_f <= err_h * 1.05 + 1e-6, f"{name}: fused {err_f:.2e} vs hook {err_h:.2e}"
        assert err_f < 2e-2
    for name in set(fused) - fused_names:                           # the rest still goes through the hook
        torch.testing.assert_close(fused[name], hooked[name], rtol=0, atol=0)


@pytest.mark.parametrize("recompute,backend", [("none", "torch"), ("selective", "torch"), ("selective", "triton")])
@pytest.mark.slow
def test_fused_accumulators_under_compile_match_the_hook_under_compile(recompute, backend):
    """Compiled (aot_eager: the traced graphs, no code generation), the fused accumulators differ
    from the hook's by the bf16 rounding of each micro-batch's weight gradient only, as eager; the
    unfused ones are identical (a lost add in the compiled backward would leave zeros)."""
    if backend == "triton":
        pytest.importorskip("triton")
    model, eng, fused = _accumulated(FUSED, n_micro=2, compile_backend="aot_eager", recompute=recompute, backend=backend)
    _, _, hooked = _accumulated(HOOK, n_micro=2, compile_backend="aot_eager", recompute=recompute, backend=backend)
    assert any(isinstance(m, FusedWgradLinear) for m in model.modules())
    fused_names = {n for n, p in zip(eng.masters.names, eng.masters.params) if any(p is f for f in eng.masters.fused)}
    n_experts_fused = 2 * (CFG["num_hidden_layers"] - 1) if backend == "triton" else 0
    assert len(fused_names) == N_DENSE_FUSED + n_experts_fused
    for name in fused:
        if name in fused_names:
            rel = (fused[name] - hooked[name]).norm() / hooked[name].norm()
            assert hooked[name].norm() > 0 and rel < 4e-3, f"{name}: {rel:.2e}"
        else:
            torch.testing.assert_close(fused[name], hooked[name], rtol=0, atol=0)


def test_selective_recompute_keeps_the_fused_linear_output():
    x, w, acc = torch.zeros(2, 64), torch.zeros(128, 64), torch.zeros(128, 64)
    assert keeps_output(torch.ops.anneal.fused_wgrad_linear.default, (x, w, acc), CFG["moe_intermediate_size"])


def test_state_dict_and_step_are_unchanged_by_the_swap():
    model_f, eng_f, _ = _accumulated(FUSED)
    model_h, _, _ = _accumulated(HOOK)
    assert list(model_f.state_dict()) == list(model_h.state_dict())
    before = [m.clone() for m in eng_f.masters.masters]
    eng_f.step(1e-3)
    assert any(not torch.equal(a, m) for a, m in zip(before, eng_f.masters.masters))
    assert all(m.grad.abs().sum() == 0 for m in eng_f.masters.masters)   # accumulators cleared in place
    mod = model_f.model.layers[0].self_attn.q_proj
    assert mod.main_grad is eng_f.masters.masters[eng_f.masters.names.index("model.layers.0.self_attn.q_proj.weight")].grad


def test_the_policy_fuses_only_bf16_compute_with_fp32_sums(monkeypatch):
    """`trainer.grad_accum_fusion` reaches the policy on a (faked) bf16 GPU; fp32 compute (CPU) and
    bf16 sums have nothing to fuse into."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda = torch.device("cuda")
    assert PrecisionPolicy.for_device(True, cuda, note=lambda _: None, fusion=True).fuses_grad_accumulation
    assert not PrecisionPolicy.for_device(True, cuda, note=lambda _: None, fusion=False).fuses_grad_accumulation
    assert not PrecisionPolicy.for_device(True, cuda, note=lambda _: None, grad_accum="bf16",
                                          fusion=True).fuses_grad_accumulation
    assert not PrecisionPolicy.for_device(True, torch.device("cpu"), note=lambda _: None,
                                          fusion=True).fuses_grad_accumulation
