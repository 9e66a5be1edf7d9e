"""The mixed-precision policy (anneal.model.precision) on CPU: bf16 compute weights, fp32 masters, fp32
gradient accumulation, fp32 router/bias/loss, and the fp32 checkpoint. The policy is the same on
GPU; CPU runs it here with bf16 CPU matmuls so that it is tested without a GPU."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from anneal.config import TrainerCfg
from anneal.model.dots1 import Dots1ForCausalLM
from anneal.model.config import Dots1Config
from anneal.model.precision import PrecisionPolicy
from anneal.train.engine import Engine
from anneal.train.step import accumulate
from moe.experts import available_backends

CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "linear", "matmul",
           "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention", "triton_experts_fwd",
           "triton_experts_bwd"}


class RecordMatmulDtypes(TorchDispatchMode):
    """Records the floating dtypes of every matmul-like op's matrix operands (forward and backward;
    1-D operands such as the Triton op's fp32 routing weights are scales, not GEMM operands)."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}
        self.fp32_shapes: list[list[tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in MATMULS:
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                       if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 2]
            dtypes = {a.dtype for a in tensors}
            self.seen.setdefault(name, set()).update(dtypes)
            if torch.float32 in dtypes:
                self.fp32_shapes.append([tuple(a.shape) for a in tensors])
        return func(*args, **(kwargs or {}))


def _model(backend: str) -> Dots1ForCausalLM:
    model = Dots1ForCausalLM(Dots1Config(**CFG), experts_backend=backend)
    model.init_weights(seed=0)
    return model.train()


def _batches(n: int, seed: int = 0, rows: int = 2, seq: int = 32):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, CFG["vocab_size"], (rows, seq + 1), generator=gen)
        out.append({"input_ids": ids, "position_ids": torch.arange(seq + 1).expand(rows, -1),
                    "source_ids": torch.zeros_like(ids)})
    return out


def _tcfg():
    return OmegaConf.structured(TrainerCfg(grad_clip=1.0))


def _step(backend: str, policy: PrecisionPolicy, n_micro: int = 3):
    model = _model(backend)
    engine = Engine(model, _tcfg(), policy)
    sums = accumulate(model, engine, iter(_batches(n_micro)), n_micro, 1, torch.device("cpu"))
    grads = [m.grad.clone() for m in engine.masters.masters] if engine.masters else \
        [p.grad.clone() for p in engine.params]
    engine.step(1e-3)
    return model, engine, float(sums["loss_sum"].sum() / sums["count"].sum()), grads


@pytest.mark.parametrize("backend", ["torch", "grouped_mm", "triton"])
def test_bf16_policy_every_matmul_sees_bf16_operands(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    model = _model(backend)
    engine = Engine(model, _tcfg(), PrecisionPolicy(torch.bfloat16))
    rec = RecordMatmulDtypes()
    with rec:
        # Triton runs interpreted on CPU (one Python call per program): fewer tokens keep it quick
        small = dict(rows=1, seq=8) if backend == "triton" else {}
        accumulate(model, engine, iter(_batches(2, **small)), 2, 1, torch.device("cpu"))
    assert rec.seen, "no matmul recorded"
    assert all(dtypes <= {torch.bfloat16, torch.float32} for dtypes in rec.seen.values())
    # fp32 operands only in the router's logits GEMM (an fp32 island): one operand has E = 8 columns
    # or rows (no other matmul of this config has a dimension of 8); every other matmul is bf16
    n_exp = CFG["n_routed_experts"]
    for shapes in rec.fp32_shapes:
        assert any(n_exp in s for s in shapes), f"an fp32 matmul outside the router: operands {shapes}"
    assert rec.fp32_shapes, "the router logits should be computed in fp32"
    expert_ops = {"_grouped_mm"} if backend == "grouped_mm" else (
        {"triton_experts_fwd", "triton_experts_bwd"} if backend == "triton" else set())
    for name in expert_ops:
        assert rec.seen.get(name) == {torch.bfloat16}, f"experts op {name} saw {rec.seen.get(name)}"
    attention = [n for n in rec.seen if "scaled_dot_product" in n]
    assert attention and all(rec.seen[n] == {torch.bfloat16} for n in attention)


def test_bf16_policy_masters_grads_state_and_checkpoint_are_fp32():
    model, engine, _, grads = _step("torch", PrecisionPolicy(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for router in model.routers().values():  # fp32 islands stay fp32
        assert router.e_score_correction_bias.dtype == torch.float32
        assert router.expert_load.dtype == torch.float32
    assert all(m.dtype == torch.float32 for m in engine.masters.masters)
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    for state in engine.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    # the compute weights are the rounded masters; the checkpoint holds the masters themselves
    for p, m in zip(engine.masters.params, engine.masters.masters):
        assert torch.equal(p, m.to(torch.bfloat16))
    sd = engine.model_state_dict()
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert any(not torch.equal(sd[n], sd[n].to(torch.bfloat16).float()) for n in engine.masters.names)


def test_bf16_step_matches_fp32_step_within_bf16_tolerance():
    _, _, loss32, grads32 = _step("torch", PrecisionPolicy(torch.float32), n_micro=4)
    _, _, loss16, grads16 = _step("torch", PrecisionPolicy(torch.bfloat16), n_micro=4)
    assert abs(loss16 - loss32) / loss32 < 1e-2
    flat32, flat16 = torch.cat([g.flatten() for g in grads32]), torch.cat([g.flatten() for g in grads16])
    cos = torch.nn.functional.cosine_similarity(flat32, flat16, dim=0)
    assert cos > 0.99, f"accumulated gradients differ: cosine {cos:.4f}"


def test_gradients_accumulate_in_fp32_across_micro_batches():
    """Many tiny micro-batch gradients summed into one accumulator: fp32 keeps what bf16 would round
    away (the sum equals the fp32 sum of the bf16 per-micro-batch gradients)."""
    model = _model("torch")
    engine = Engine(model, _tcfg(), PrecisionPolicy(torch.bfloat16))
    p, master = engine.masters.params[0], engine.masters.masters[0]
    for _ in range(64):
        (p.float().sum() * 1e-3).backward()
    expected = torch.full_like(master, 64 * torch.tensor(1e-3, dtype=torch.bfloat16).float().item())
    torch.testing.assert_close(master.grad, expected, rtol=1e-6, atol=0)
    assert p.grad is None  # the bf16 gradient is freed once added


def test_bf16_on_cpu_gives_a_note_and_runs_fp32():
    notes = []
    policy = PrecisionPolicy.for_device(True, torch.device("cpu"), note=notes.append)
    assert policy.compute_dtype == torch.float32 and not policy.mixed
    assert len(notes) == 1 and "fp32" in notes[0] and "trainer.bf16" in notes[0]
    assert PrecisionPolicy.for_device(False, torch.device("cpu"), note=notes.append).compute_dtype == torch.float32
    assert len(notes) == 1


def test_bf16_accumulation_option_converts_once_before_the_update():
    """trainer.grad_accum_dtype=bf16: no per-micro-batch hook; autograd sums bf16 gradients and the
    step converts them once. The masters still update in fp32 and match the fp32-accumulated run
    within bf16 tolerance."""
    policy = PrecisionPolicy(torch.bfloat16, torch.bfloat16)
    model, engine, loss, _ = _step("torch", policy, n_micro=2)
    assert not engine.masters.fp32_accumulation
    assert all(p.grad is None for p in engine.masters.params)  # moved into the masters, then freed
    assert all(m.dtype == torch.float32 for m in engine.masters.masters)
    _, _, loss_fp32, _ = _step("torch", PrecisionPolicy(torch.bfloat16), n_micro=2)
    assert loss == loss_fp32  # same forward; only the gradient sum differs
    with pytest.raises(Exception, match="grad_accum_dtype"):
        PrecisionPolicy.for_device(True, torch.device("cpu"), note=lambda _: None, grad_accum="fp16")


def test_deepspeed_config_follows_the_policy():
    from anneal.parallel.ds_config import deepspeed_config

    cfg = deepspeed_config(_tcfg(), zero_stage=1, bf16=True)
    assert cfg["bf16"]["enabled"] and cfg["data_types"]["grad_accum_dtype"] == "fp32"
    assert deepspeed_config(_tcfg(), zero_stage=1, bf16=True, grad_accum_dtype="bf16")["data_types"] == \
        {"grad_accum_dtype": "bf16"}
    assert "data_types" not in deepspeed_config(_tcfg(), zero_stage=1, bf16=False)


def test_bf16_on_a_gpu_without_bf16_is_one_clear_error(monkeypatch):
    from anneal.errors import AnnealError

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(AnnealError, match=r"trainer.bf16=true but Tesla V100.*no bf16 support.*trainer.bf16=false"):
        PrecisionPolicy.for_device(True, torch.device("cuda"), note=lambda _: None)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_step_clips_and_updates_as_fp64_adamw_does(fused):
    """The native step against fp64 arithmetic, with a clip that binds: `clip_grad_norm_` then AdamW
    (foreach, the CPU default), or the clip folded into fused AdamW as it reads each gradient (the
    CUDA default). Both must move every weight as AdamW moves it from the clipped gradient. An eps
    near the clipped gradients' size makes the update depend on their scale (AdamW's first step is
    otherwise lr * sign(g), whatever the clip)."""
    clip, lr = 0.05, 1e-3
    tcfg = OmegaConf.structured(TrainerCfg(grad_clip=clip, eps=1e-4))
    model = _model("torch")
    engine = Engine(model, tcfg, PrecisionPolicy(torch.float32), fused=fused)
    accumulate(model, engine, iter(_batches(2)), 2, 1, torch.device("cpu"))
    grads = [p.grad.double().clone() for p in engine.params]
    before = [p.detach().double().clone() for p in engine.params]
    norm = engine.step(lr)
    ref_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    assert ref_norm > 10 * clip  # the clip binds
    assert abs(norm - ref_norm) / ref_norm < 1e-5
    coef = clip / (ref_norm + 1e-6)
    (b1, b2), eps = tcfg.betas, tcfg.eps
    for p, g, w in zip(engine.params, grads, before):
        g = g * coef
        m_hat, v_hat = g, g * g  # AdamW's first moments, bias-corrected
        step = lr * m_hat / (v_hat.sqrt() + eps)
        wd = tcfg.weight_decay if p.ndim >= 2 else 0.0
        expected = w * (1 - lr * wd) - step
        moved, want = p.detach().double() - w, expected - w
        # fp32 weights: w - step rounds to w's ulp (~1e-8 here, against steps ~1e-4)
        assert torch.linalg.vector_norm(moved - want) <= 1e-3 * torch.linalg.vector_norm(want)
