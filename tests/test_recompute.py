"""`model.recompute` (anneal.model.recompute): selective and full recompute give `none`'s numbers
(losses, gradients, router loads, weights after an AdamW step), eager and compiled, in the plain and
the paired schedule; selective keeps less activation memory than none and more than full; the old
`model.gradient_checkpointing` key is refused with the new spelling."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from anneal.errors import AnnealError
from anneal.model.config import Dots1Config
from anneal.model.dots1 import Dots1ForCausalLM
from anneal.model.recompute import keeps_output

CFG = dict(model_type="dots1", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _model(mode: str, backend: str = "torch", dtype=torch.float32, compile_backend: str | None = None):
    model = Dots1ForCausalLM(Dots1Config.from_hf_dict(dict(CFG)), backend, aux_loss_coef=0.01, recompute=mode,
                             document_mask=True)
    model.init_weights(seed=0)
    model.to(dtype).train()
    if compile_backend:
        model.compile_layers(compile_backend)
    return model


def _batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG["vocab_size"], (2, 65), generator=gen)
    pos = torch.cat([torch.arange(40), torch.arange(25)]).expand(2, -1)  # two packed documents per row
    return ids, pos


def _forward(model, seed: int = 1):
    ids, pos = _batch(seed)
    losses = model.token_losses(ids[:, :-1], ids[:, 1:], position_ids=pos[:, :-1])
    return losses.mean() + model.aux_loss()


def _step(model):
    """Loss, gradients, router loads and the weights after one AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = _forward(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    loads = [r.expert_load.clone() for r in model.routers().values()]
    opt.step()
    return loss.detach(), grads, loads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a, b, atol: float = 0.0):
    """Tolerance 0 (bitwise) in eager fp32: recompute runs the same ops on the same values."""
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=atol)
    for part in (1, 3):
        for n in a[part]:
            torch.testing.assert_close(a[part][n], b[part][n], rtol=0, atol=atol, msg=lambda m: f"{n}: {m}")
    for la, lb in zip(a[2], b[2]):  # each token counted once, not again when the backward recomputes
        assert torch.equal(la, lb)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_eager_fp32_matches_none_bitwise(mode):
    _assert_same(_step(_model(mode)), _step(_model("none")))


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch._grouped_mm missing")
@pytest.mark.slow
def test_compiled_selective_matches_none_without_graph_breaks():
    """Regional compilation traces the selective checkpoint inside each layer's graph (aot_eager:
    AOTAutograd's partition, no code generation); grouped_mm traces in bf16 only. No graph break,
    the router's load counted once, the same numbers as compiled `none` (bf16: to its rounding)."""
    counters.clear()
    sel = _step(_model("selective", "grouped_mm", torch.bfloat16, "aot_eager"))
    assert not counters["graph_break"], dict(counters["graph_break"])
    _assert_same(sel, _step(_model("none", "grouped_mm", torch.bfloat16, "aot_eager")), atol=1e-2)


def _activation_bytes(model) -> int:
    """Bytes allocated in the forward and still alive after it (what the backward will use)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = _forward(model)
    kept = sum(e.self_cpu_memory_usage for e in prof.events())
    loss.backward()
    return kept


def test_selective_keeps_less_than_none_and_more_than_full():
    none, sel, full = (_activation_bytes(_model(m)) for m in ("none", "selective", "full"))
    assert full < sel < 0.6 * none, (none, sel, full)


def test_policy_keeps_matmuls_and_attention_but_not_the_experts_down_projection():
    aten = torch.ops.aten
    x_hidden, x_inner = torch.empty(4, 64), torch.empty(4, 32)
    assert keeps_output(aten.mm.default, (x_hidden, torch.empty(64, 8)), expert_inner=32)
    assert not keeps_output(aten.mm.default, (x_inner, torch.empty(32, 64)), expert_inner=32)
    assert keeps_output(aten._scaled_dot_product_flash_attention_for_cpu.default, (x_hidden,), expert_inner=32)
    for cheap in (aten.mul.Tensor, aten.rsqrt.default, aten.silu.default, aten.topk.default, aten.index_select.default):
        assert not keeps_output(cheap, (x_hidden,), expert_inner=32)


def test_paired_schedule_one_process_matches_plain():
    """Selective through the paired schedule = none through the plain one, bitwise (EP 2 under
    DeepSpeed with selective: tests/test_paired_schedule.py::test_ep2_deepspeed_matches_plain_schedule)."""
    from test_paired_schedule import TCFG, _assert_same as same_rows, _model as paired_model, _train

    from anneal.train.engine import Engine

    plain, paired = paired_model("none", "torch"), paired_model("selective", "torch")
    same_rows(plain, paired, _train(plain, Engine(plain, TCFG), paired=False),
              _train(paired, Engine(paired, TCFG), paired=True))


def test_config_key_and_old_spelling():
    from anneal.cli import compose
    from anneal.config import validate_config

    validate_config(compose(["model.recompute=selective"]))
    with pytest.raises(AnnealError, match="model.recompute=.*must be one of none, selective, full"):
        validate_config(compose(["model.recompute=some"]))
    with pytest.raises(AnnealError, match=r"model.gradient_checkpointing=True is replaced by model.recompute: "
                                          r"use model.recompute=full"):
        validate_config(compose(["model.gradient_checkpointing=true"]))
    with pytest.raises(AnnealError, match="model.recompute='half'"):
        _model("half")


def test_compiled_grouped_mm_refuses_selective_recompute():
    """The combination aborts on CUDA (torch 2.11; bench/RESULTS.md): refused before any weight is read,
    with what to use instead; eager, or with another backend, selective is accepted."""
    from anneal.cli import compose
    from anneal.config import validate_config

    with pytest.raises(AnnealError, match=r"model.recompute=selective with model.experts_backend=grouped_mm "
                                          r"under model.compile .*use model.experts_backend=triton"):
        validate_config(compose(["model.recompute=selective", "model.experts_backend=grouped_mm",
                                 "model.compile=true"]))
    validate_config(compose(["model.recompute=selective", "model.experts_backend=grouped_mm", "model.compile=false"]))
    validate_config(compose(["model.recompute=selective", "model.experts_backend=torch", "model.compile=true"]))
