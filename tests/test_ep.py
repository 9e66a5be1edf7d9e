"""Dropless expert parallelism on CPU: gloo process groups in 2 and 4 processes.

Every rank builds the same full layer/model (same seed), computes the single-process reference
on the whole batch (the concatenation of all ranks' batches), then shards the experts, runs its
own part under EP and compares outputs, gradients (expert grads gathered over the EP group) and
the router bias update against the reference.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from _dist import run_distributed
from moe import ep
from moe.layer import Dots1MoE, moe_layers

H, E, K, INTER = 32, 8, 3, 16
ATOL, RTOL = 1e-5, 1e-4


def _layer(seed: int = 0, backend: str = "torch") -> Dots1MoE:
    torch.manual_seed(seed)
    layer = Dots1MoE(H, E, K, INTER, n_shared_experts=1, routed_scaling_factor=2.5, backend=backend)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
        layer.gate.e_score_correction_bias.normal_(0, 0.05)
    return layer.train()


def _batches(world: int, tokens: list[int] | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or [24] * world
    xs = [torch.randn(2, t // 2, H, generator=g) for t in tokens]
    gs = [torch.randn(2, t // 2, H, generator=g) for t in tokens]
    return xs, gs


@torch.no_grad()
def allreduce_gradients(model, groups: ep.EPGroups) -> None:
    """Engine-free gradient reduction for DP x EP, as the DeepSpeed engine does it (see `moe.ep`):
    dense grads averaged over the world; expert grads summed over the EDP group and divided by the
    world size."""
    world = groups.world_size
    for p in model.parameters():
        if p.grad is None:
            continue
        if ep.is_expert_param(p):
            if groups.edp_size > 1:
                dist.all_reduce(p.grad, group=groups.edp_group)
        elif world > 1:
            dist.all_reduce(p.grad)
        p.grad.div_(world)


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _check_layer(rank, world, ep_size, tokens, skew, backend):
    """One MoE layer: loss_r = sum(out_r * g_r); global loss = mean over ranks."""
    full = _layer(backend=backend)
    if skew:  # bias 5 > any sigmoid gap: every token picks experts 0..K-1, all on EP rank 0 -> rank 1 gets no rows
        with torch.no_grad():
            full.gate.e_score_correction_bias.copy_(torch.tensor([5.0] * K + [0.0] * (E - K)))
    xs, gs = _batches(world, tokens)
    ref = copy.deepcopy(full)
    x_all = torch.cat([x.reshape(-1, H) for x in xs]).requires_grad_()
    out_all = ref(x_all.unsqueeze(0)).squeeze(0)
    (out_all * torch.cat([g.reshape(-1, H) for g in gs])).sum().div(world).backward()
    ref_load = ref.gate.expert_load.clone()

    groups = ep.build_ep_groups(ep_size, E)
    model = copy.deepcopy(full)
    start, stop = ep.shard_experts(model, groups)
    assert (start, stop) == (groups.ep_rank * E // ep_size, (groups.ep_rank + 1) * E // ep_size)
    assert model.experts.w_gate_up.shape[0] == E // ep_size
    x = xs[rank].clone().requires_grad_()
    out = model(x)
    (out * gs[rank]).sum().backward()  # local loss; allreduce_gradients averages over ranks
    allreduce_gradients(model, groups)

    offs = [0] + torch.cumsum(torch.tensor(tokens), 0).tolist()
    _close(out.reshape(-1, H), out_all[offs[rank]:offs[rank + 1]].detach(), "layer output")
    _close(x.grad.reshape(-1, H) / world, x_all.grad[offs[rank]:offs[rank + 1]], "input grad")
    _close(model.gate.weight.grad, ref.gate.weight.grad, "router weight grad")
    for (n, p), (_, q) in zip(model.shared_experts.named_parameters(), ref.shared_experts.named_parameters()):
        _close(p.grad, q.grad, f"shared expert grad {n}")
    _close(model.experts.w_gate_up.grad, ref.experts.w_gate_up.grad[start:stop], "local w_gate_up grad")
    _close(ep.gather_experts(model.experts.w_gate_up.grad, groups), ref.experts.w_gate_up.grad, "gathered w_gate_up grad")
    _close(ep.gather_experts(model.experts.w_down.grad, groups), ref.experts.w_down.grad, "gathered w_down grad")

    # aux-loss-free bias update with the global load: identical on every rank, equal to the reference
    local_load = model.gate.expert_load.clone()
    ep.allreduce_expert_load([model.gate])
    torch.testing.assert_close(model.gate.expert_load, ref_load)
    if world > 1 and not skew:
        assert not torch.equal(local_load, ref_load)
    model.gate.update_bias(0.01, model.gate.expert_load)
    ref.gate.update_bias(0.01, ref_load)
    torch.testing.assert_close(model.gate.e_score_correction_bias, ref.gate.e_score_correction_bias)
    biases = [torch.empty_like(model.gate.e_score_correction_bias) for _ in range(world)]
    dist.all_gather(biases, model.gate.e_score_correction_bias)
    assert all(torch.equal(b, biases[0]) for b in biases)


def _worker_layer(rank, world, ep_size, tokens, skew, backend="torch"):
    _check_layer(rank, world, ep_size, tokens, skew, backend)


def test_ep2_layer_matches_single_process():
    run_distributed(_worker_layer, 2, 2, [24, 24], False)


def test_ep2_uneven_tokens_and_empty_ranks():
    """Different token counts per rank, and routing so skewed that one rank gets no rows."""
    run_distributed(_worker_layer, 2, 2, [30, 8], True)


def test_ep2_grouped_mm_backend():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    try:  # CPU support of torch._grouped_mm depends on the torch build
        from moe.experts import get_backend
        get_backend("grouped_mm").grouped_mlp(torch.randn(4, H), torch.tensor([2, 2]),
                                              torch.randn(2, H, 2 * INTER), torch.randn(2, INTER, H))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"grouped_mm does not run on this CPU build: {e}")
    run_distributed(_worker_layer, 2, 2, [24, 16], False, "grouped_mm")


def test_dp2_x_ep2_layer_matches_single_process():
    """4 ranks: EP groups {0,1},{2,3}; EDP groups {0,2},{1,3}."""
    run_distributed(_worker_layer, 4, 2, [16, 24, 8, 20], False)


def test_dp2_ep1_layer():
    """Pure data parallelism through the same code (EP size 1: no all-to-all)."""
    run_distributed(_worker_layer, 2, 1, [16, 24], False)


def test_regroup_index():
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])  # 2 sources x 3 local experts, rows (src, exp)
    idx = ep._regroup_index(counts)
    # rows: src0: e0 e0 e2 | src1: e0 e1 e1 e1  -> grouped: e0(s0,s0,s1) e1(s1 x3) e2(s0)
    assert idx.tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert ep._regroup_index(torch.zeros(2, 3, dtype=torch.long)).numel() == 0


@pytest.mark.parametrize("ep_size,world,msg", [(3, 6, "does not divide the routed expert count 8"),
                                               (4, 6, "does not divide the world size 6"),
                                               (0, 2, "must be >= 1")])
def test_bad_ep_size(ep_size, world, msg):
    with pytest.raises(ep.EPError, match=msg):
        ep.check_ep_size(ep_size, E, world)


# ------------------------------------------------------------------------------- whole model
TINY = dict(model_type="dots1", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
            routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=64, tie_word_embeddings=False)


def tiny_model(seed: int = 0):
    from anneal.model.dots1 import Dots1ForCausalLM
    from anneal.model.config import Dots1Config

    model = Dots1ForCausalLM(Dots1Config.from_hf_dict(dict(TINY)))
    model.init_weights(seed=seed)
    with torch.no_grad():  # larger than initializer_range so that routing and grads are not tiny
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + len(n)))
    return model.train()


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _worker_model(rank, world, ep_size):
    full = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (2 * world, 17), generator=torch.Generator().manual_seed(3))
    ref = copy.deepcopy(full)
    ref_loss = _loss(ref, ids)
    ref_loss.backward()

    groups = ep.build_ep_groups(ep_size, TINY["n_routed_experts"])
    model = copy.deepcopy(full)
    start, stop = ep.shard_experts(model, groups)
    loss = _loss(model, ids[2 * rank:2 * rank + 2])
    loss.backward()
    allreduce_gradients(model, groups)
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    _close(torch.stack(losses).mean(), ref_loss.detach(), "loss")
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        want = ref_params[n].grad
        if ep.is_expert_param(p):
            _close(p.grad, want[start:stop], f"grad {n} (local)")
            _close(ep.gather_experts(p.grad, groups), want, f"grad {n} (gathered)")
        else:
            _close(p.grad, want, f"grad {n}")
    full_sd = ep.full_state_dict(model, groups)
    for n, t in ref.state_dict().items():
        if "expert_load" not in n:
            torch.testing.assert_close(full_sd[n], t, msg=lambda m: f"full_state_dict {n}: {m}")
    loads = ep.allreduce_expert_load(model.routers())
    _close(loads, torch.stack([r.expert_load for r in ref.routers().values()]), "global expert load")


def test_ep2_model_loss_and_grads_match_single_process():
    run_distributed(_worker_model, 2, 2)


def test_shard_refuses_wrong_partial_model():
    """A model loaded with another rank's expert range is refused with the range it needs."""
    run_distributed(_worker_wrong_range, 2)


def _worker_wrong_range(rank, world):
    model = tiny_model()
    groups = ep.build_ep_groups(2, 8)
    other = (4, 8) if groups.ep_rank == 0 else (0, 4)
    for layer in moe_layers(model):
        layer.experts.hold_experts(*other)
    with pytest.raises(ep.EPError, match=r"owns experts \[%d, %d\)" % (4 * groups.ep_rank, 4 * groups.ep_rank + 4)):
        ep.shard_experts(model, groups)
