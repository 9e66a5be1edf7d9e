"""Regional compilation (`Dots1ForCausalLM.compile_layers`): same numbers as eager, no graph break
inside a decoder layer with the grouped_mm and Triton backends (the Triton kernels are opaque
custom ops), and no recompilation when a step runs more micro-batches of the same shape."""
import pytest
import torch
from torch._dynamo.utils import counters

from anneal.model.dots1 import Dots1ForCausalLM
from anneal.model.config import Dots1Config
from moe.experts import available_backends

CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)


def _batch(seed, rows=2, docs=(20, 13)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG["vocab_size"], (rows, sum(docs)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in docs]).expand(rows, -1)  # packed documents per row
    return ids, pos


def _loss_and_grads(model, seed, **shape):
    ids, pos = _batch(seed, **shape)
    losses = model.token_losses(ids[:, :-1], ids[:, 1:], position_ids=pos[:, :-1])
    losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return losses.detach(), grads


# torch._grouped_mm traces only in bf16 (its meta function refuses fp32), which is what the policy
# gives it on GPU. Inductor (real code generation) on one case; aot_eager checks tracing, the
# custom ops and autograd without the C++ compile time. (The torch loop backend reads row counts on
# the host: a graph break it needs; it is the reference, not a training backend.)
CASES = [("grouped_mm", "inductor", torch.bfloat16, 3e-2),
         ("grouped_mm", "aot_eager", torch.bfloat16, 1e-6), ("triton", "aot_eager", torch.float32, 1e-6)]


@pytest.mark.parametrize("backend,compiler,dtype,tol", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@pytest.mark.slow
def test_compiled_layers_match_eager_without_graph_breaks(backend, compiler, dtype, tol):
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    eager = Dots1ForCausalLM(Dots1Config(**CFG), experts_backend=backend)
    eager.init_weights(seed=0)
    compiled = Dots1ForCausalLM(Dots1Config(**CFG), experts_backend=backend)
    compiled.load_state_dict(eager.state_dict())
    eager.to_dtype(dtype)
    compiled.to_dtype(dtype)
    compiled.compile_layers(backend=compiler)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # names unchanged (checkpoints, export)
    torch._dynamo.reset()
    counters.clear()
    # Triton runs interpreted on CPU (one Python call per program): fewer tokens keep it quick
    shape = dict(rows=1, docs=(5, 4)) if backend == "triton" else {}
    want_loss, want_grads = _loss_and_grads(eager, 0, **shape)
    got_loss, got_grads = _loss_and_grads(compiled, 0, **shape)
    torch.testing.assert_close(got_loss, want_loss, atol=tol, rtol=tol)
    for name, g in want_grads.items():
        rel = ((got_grads[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)).item()
        assert rel < 10 * tol, f"{name}: relative gradient difference {rel:.2e}"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the dense layer, the MoE layers (one graph for all of them), the head + loss
    _loss_and_grads(compiled, 1, **shape)  # one more micro-batch of the same shape (a batch-ramp step): no recompile
    assert counters["stats"]["unique_graphs"] == graphs
