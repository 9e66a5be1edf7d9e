"""The DeepSpeed behaviour that `anneal.parallel.deepspeed_compat` relies on, pinned (CPU, gloo).

Everything anneal takes from DeepSpeed's internals goes through that adapter; each test here pins
one piece of its contract, so a DeepSpeed upgrade that changes it fails in this file, by name,
before it shows up as a wrong gradient elsewhere. The adapter was written against 0.19.8.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

deepspeed = pytest.importorskip("deepspeed")

from _dist import run_distributed  # noqa: E402
from anneal.parallel import deepspeed_compat as compat  # noqa: E402
from anneal.parallel.ds_config import offload_optimizer_config  # noqa: E402
from moe import ep  # noqa: E402
from moe.experts import GroupedExperts, is_expert_param  # noqa: E402
from moe.layer import Dots1MoE, moe_layers  # noqa: E402
from test_ep import TINY, _loss, tiny_model  # noqa: E402

TCFG = SimpleNamespace(micro_batch_size=1, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=0.5, bf16=False)


def test_written_against_deepspeed_0_19_8():
    """Another version: re-check every point of the adapter's contract (its module docstring)
    against the new DeepSpeed, then update this pin."""
    assert deepspeed.__version__ == "0.19.8", deepspeed.__version__


def _marked_model():
    """A tiny model whose experts carry moe's mark, as `moe.ep.shard_experts` leaves them."""
    model = tiny_model()
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.mark_expert_params()
    return model


def _fake_groups(ep_size: int) -> ep.EPGroups:
    return ep.EPGroups(ep_size=ep_size, ep_rank=0, ep_group=None, edp_size=1, edp_rank=0, edp_group=None,
                       world_size=ep_size)


def test_register_moe_layers_gives_deepspeed_its_moe_layer_and_expert_flags():
    """DeepSpeed's engine finds MoE layers by `isinstance(m, deepspeed.moe.layer.MoE)` and reads
    num_experts / ep_size / expert_group_name from them; its ZeRO optimizer recognizes expert
    parameters by `allreduce=False` (`deepspeed.moe.utils.is_moe_param`) and reduces them over the
    group named by `group_name`. Our layers keep their own forward."""
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param

    model = _marked_model().train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(ids)
    assert compat.register_moe_layers(model, _fake_groups(2)) == 2
    for layer in moe_layers(model):
        assert isinstance(layer, MoE) and isinstance(layer, Dots1MoE)
        assert (layer.num_experts, layer.ep_size, layer.num_local_experts) == (8, 2, 4)
        assert layer.expert_group_name == "ep_size_2"
    torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
    for name, p in model.named_parameters():
        assert is_moe_param(p) == is_expert_param(p) == ("experts.w_" in name), name
        if is_expert_param(p):
            assert p.group_name == "ep_size_2"


def test_moe_param_groups_split_experts_into_moe_groups():
    """`split_params_into_different_moe_groups_for_optimizer`: expert params move to groups marked
    `moe=True` named after their EP group, keeping their group's other keys (weight decay)."""
    model = _marked_model()
    compat.register_moe_layers(model, _fake_groups(2))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = compat.moe_param_groups([{"params": decay, "weight_decay": 0.1, "name": "decay"},
                                      {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}])
    moe = [g for g in groups if g.get("moe")]
    assert len(moe) == 1 and "ep_size_2" in moe[0]["name"] and moe[0]["weight_decay"] == 0.1
    experts = {id(p) for p in model.parameters() if is_expert_param(p)}
    assert {id(p) for p in moe[0]["params"]} == experts
    assert all(id(p) not in experts for g in groups if not g.get("moe") for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_offload_section_is_deepspeeds_zero_offload_key():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig(stage=2, **offload_optimizer_config(pin_memory=False))
    assert zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu"
    assert zero.offload_optimizer.pin_memory is False


def test_offload_asks_for_exact_pinned_sizes():
    """torch's pinned allocator rounds blocks up to a power of two unless told otherwise; the limit
    is added to the allocator settings already in force, and a user's own limit is kept. (Whether a
    given torch then pins exact sizes is measured on the device, not here: 2.11 did not.)"""
    get, set_ = torch._C._accelerator_getAllocatorSettings, torch._C._accelerator_setAllocatorSettings
    set_("pinned_use_background_threads:False")
    assert compat.exact_pinned_allocations()
    assert get() == f"pinned_use_background_threads:False,pinned_max_round_threshold_mb:{compat.PINNED_ROUND_LIMIT_MB}"
    set_("pinned_max_round_threshold_mb:8")
    compat.exact_pinned_allocations()
    assert get() == "pinned_max_round_threshold_mb:8"


def _ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group)


def _groups_worker(rank, world):
    """DeepSpeed's private group API makes EP groups of consecutive ranks and EDP groups of strided
    ones (moe.ep's layout), and keeps them under `ep_size_<P>`."""
    compat.init_distributed("cpu")
    for ep_size in (world, 1):
        groups = compat.expert_parallel_groups(ep_size, 8)
        assert compat.group_name(ep_size) in deepspeed.utils.groups._get_expert_parallel_group_dict()
        start = rank // ep_size * ep_size
        assert _ranks(groups.ep_group) == list(range(start, start + ep_size)), (ep_size, _ranks(groups.ep_group))
        assert _ranks(groups.edp_group) == list(range(rank % ep_size, world, ep_size))
        own = ep.build_ep_groups(ep_size, 8)  # moe.ep's own groups: the same ranks
        assert _ranks(own.ep_group) == _ranks(groups.ep_group) and _ranks(own.edp_group) == _ranks(groups.edp_group)
        assert compat.expert_parallel_groups(ep_size, 8).ep_group is groups.ep_group  # made once
    # no shared-memory all-reduce op was built (inference only; a 1.5-minute compile on a fresh machine)
    assert deepspeed.comm.comm.cdb.shm_comm_op is None


def test_expert_parallel_groups_have_moe_eps_layout():
    run_distributed(_groups_worker, 2)


def _engine_worker(rank, world, zero_stage, bf16, offload):
    """What the engine and the checkpoint code read of DeepSpeed's engine and optimizer, and the
    dropped step: `drop_step` leaves every weight unchanged and `was_step_applied` False, and the
    step after it is applied."""
    from anneal.model.precision import PrecisionPolicy
    from anneal.parallel.ds_engine import DeepSpeedEngine

    compat.init_distributed("cpu")
    model = tiny_model()
    policy = PrecisionPolicy(torch.bfloat16) if bf16 else PrecisionPolicy()
    engine = DeepSpeedEngine(model, TCFG, ep_size=world, zero_stage=zero_stage, policy=policy, offload=offload)
    ds = engine.engine
    assert ds.has_moe_layers and ds.num_experts == [8, 8]
    assert any(g.get("moe") for g in ds.optimizer.param_groups)
    opt = ds.optimizer
    assert getattr(opt, "cpu_offload", False) == (offload == "optimizer")
    if offload == "optimizer":
        assert isinstance(opt.averaged_gradients, dict)
    for p in model.parameters():  # the fragment maps the sharded checkpoints read
        hp = getattr(p, "_hp_mapping", None)
        if hp is not None:
            assert hp.param_group_index < len(opt.optimizer.param_groups)
            assert hp.hp_fragment_address.numel >= 0 and hp.hp_fragment_address.start >= 0
            assert hp.lp_fragment_address.start >= 0

    ids = torch.randint(0, TINY["vocab_size"], (1, 13), generator=torch.Generator().manual_seed(rank))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.backward(_loss(model, ids))
    compat.drop_step(ds)
    compat.forget_dropped_gradients(ds)
    assert not ds.was_step_applied()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    engine.backward(_loss(model, ids))
    engine.step(1e-2)
    assert engine.step_applied and ds.was_step_applied()
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,bf16,offload", [(1, False, "none"),        # the ZeRO optimizer's overflow path
                                                     (1, True, "none"),         # the bf16 optimizer's (its step)
                                                     (2, True, "optimizer")])   # ZeRO-Offload, CPU Adam
def test_engine_internals_and_dropped_step(zero_stage, bf16, offload):
    run_distributed(_engine_worker, 2, zero_stage, bf16, offload)


def _streamed_worker(rank, world, device="cpu", chunk=1000):
    """Two engines from the same weights, bf16 + fp32 sums, ZeRO 2, offload: DeepSpeed's own step
    and the streamed one (`stream_offload_step`, chunks far smaller than a partition, so every
    group crosses several chunk borders; 1000 elements are rounded to 896, whole AVX-512 tiles of
    CPU Adam, whose scalar tail rounds differently: unrounded, the device's AVX-512 CPU was 1 ulp off).
    Same micro-batches, clipping active, a dropped step in the middle: the same bits in the fp32
    masters, AdamW's moments and step count, the bf16 weights and the grad norms; and the streamed
    engine keeps no host gradient."""
    from anneal.model.precision import PrecisionPolicy
    from anneal.parallel.ds_engine import DeepSpeedEngine

    compat.init_distributed(device)
    if device == "cuda":  # both engines' backward the same bits
        from anneal.train.devices import set_deterministic

        set_deterministic(True, torch.device("cuda"))
    torch.manual_seed(0)
    base = tiny_model()
    engines = []
    for _ in range(2):
        model = tiny_model()
        model.load_state_dict(base.state_dict())
        model.to(device)
        engines.append(DeepSpeedEngine(model, TCFG, ep_size=world, zero_stage=2, policy=PrecisionPolicy(torch.bfloat16),
                                       offload="optimizer", offload_chunk_mb=0))
    own, streamed = engines
    assert not own.streamed
    assert compat.stream_offload_step(streamed.engine, chunk)
    zero = streamed.engine.optimizer
    assert all(m.grad is None for m in zero.single_partition_of_fp32_groups)  # no whole host gradient
    assert zero.param_buffer_of_bit16_for_cpu_offload_groups == []            # nor bf16 upload copy
    assert zero.temp_grad_buffer_for_cpu_offload is None and zero.temp_grad_buffer_for_gpu_offload is None
    assert all(m.grad is not None for m in own.engine.optimizer.single_partition_of_fp32_groups)
    assert len(own.engine.optimizer.param_buffer_of_bit16_for_cpu_offload_groups) == len(zero.bit16_groups)
    assert zero._streamed_offload.chunk == chunk // compat.CPU_ADAM_TILE * compat.CPU_ADAM_TILE
    assert max(zero.partition_size) > 3 * chunk
    gen = torch.Generator().manual_seed(rank)
    for step in range(4):
        batches = [torch.randint(0, TINY["vocab_size"], (1, 13), generator=gen).to(device) for _ in range(3)]
        norms = []
        for engine in engines:
            for ids in batches:
                engine.backward(_loss(engine.model, ids))
            if step == 2:
                engine.skip_step()
                norms.append(None)
            else:
                norms.append(engine.step(1e-2))
        if norms[0] is not None:
            assert norms[0] > TCFG.grad_clip  # the clip scales every chunk
            assert norms[0] == norms[1], (step, norms)
        masters = [e.engine.optimizer.single_partition_of_fp32_groups for e in engines]
        states = [e.engine.optimizer.optimizer.state for e in engines]
        for a, b in zip(*masters):
            assert torch.equal(b, a), (step, (b - a).abs().max())
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(states[1][b][key], states[0][a][key]), (step, key)
            assert states[1][b]["step"] == states[0][a]["step"] == min(step + 1, 2 if step < 3 else 3)
        for (name, pa), pb in zip(own.model.named_parameters(), streamed.model.parameters()):
            assert pb.dtype == torch.bfloat16 and torch.equal(pa, pb), (step, name)


def test_streamed_offload_step_matches_deepspeeds_own():
    run_distributed(_streamed_worker, 2)


@pytest.mark.gpu
def test_streamed_offload_step_matches_deepspeeds_own_on_cuda():
    """The same on one GPU: pinned slots, the copies asynchronous on a side stream."""
    from _dist import run_on_one_gpu

    run_on_one_gpu(_streamed_worker, "cuda")
