"""Dropless expert parallelism (EP): each rank of an EP group owns `E / ep_size` routed experts.

One MoE layer's routed path under EP, for the T tokens of this rank:

1. route locally (our sigmoid router, unchanged), sort the T*K (token, expert) rows by expert
   (`moe.dispatch.permute`) -> rows already ordered by destination rank, since rank r owns the
   contiguous experts [r*E_local, (r+1)*E_local);
2. exchange the per-expert row counts (`all_to_all_single` of an [ep, E_local] int tensor), so
   every rank knows how many rows it sends to and receives from each peer;
3. variable-split `all_to_all_single` of the rows (autograd-capable: the backward is the
   reverse all-to-all of the gradients);
4. received rows come ordered (source rank, local expert); regroup them by local expert, run
   the experts backend's `grouped_mlp`, undo the regrouping;
5. all-to-all back (reverse splits) and the weighted combine (`moe.dispatch.unpermute`).

No capacity factor, nothing dropped: the splits are whatever the router chose.

Process groups (the layout of DeepSpeed's expert and expert-data-parallel groups, so a model
sharded here is consistent with the groups the DeepSpeed engine reduces over; the DeepSpeed adapter,
`anneal.parallel.deepspeed_compat`, hands its groups to `build_ep_groups`): with world size W and EP size P,
- EP groups are consecutive ranks  {0..P-1}, {P..2P-1}, ...  (all-to-all happens there);
- expert-data-parallel (EDP) groups are strided ranks {i, i+P, i+2P, ...}: the ranks that hold
  the same experts; expert gradients are reduced there, dense gradients over the whole world.

Gradient scaling (what the DeepSpeed engine does with the parameters `shard_experts` marks as
experts, `moe.experts.is_expert_param`): with each rank's loss a mean over its own tokens and the
global loss the mean over ranks, dense grads are averaged over the world; an expert's grad on its
owner already sums the contributions of every rank of its EP group (the all-to-all backward brought
them), so it is summed over the EDP group and divided by the world size.

The aux-loss-free bias update must see the *global* expert load: `allreduce_expert_load`
sums the routers' `expert_load` counters over the whole world (every rank routes its own tokens
over all E experts) before `Router.update_bias`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe.dispatch import inverse_order, permute, permute_rows, unpermute
from moe.experts import ExpertsBackend, GroupedExperts, is_expert_param


class EPError(ValueError):
    """Bad expert-parallel layout (EP size vs expert count or world size)."""


# --------------------------------------------------------------------------------------- groups
@dataclass
class EPGroups:
    """This rank's place in a DP x EP layout."""
    ep_size: int
    ep_rank: int
    ep_group: object            # ProcessGroup of the EP group (None when ep_size == 1 and no dist)
    edp_size: int
    edp_rank: int
    edp_group: object           # ProcessGroup of the expert-data-parallel group
    world_size: int
    count_group: object = None  # `counts_group`: a second group over the EP group's ranks, made on demand


def counts_group(groups: EPGroups):
    """A second process group over the ranks of this rank's EP group, for the per-expert row-count
    exchange of the paired schedule: on a communicator of its own, that small blocking exchange does
    not queue behind a row all-to-all still in flight on the EP group (NCCL runs one group's
    collectives in order). Made on first call: collective, every rank calls it at the same point."""
    if groups.count_group is None:
        groups.count_group = _own_group(_ep_blocks(groups.world_size, groups.ep_size))
    return groups.count_group


def _ep_blocks(world: int, ep_size: int) -> list[list[int]]:
    """The ranks of each EP group: consecutive blocks of `ep_size`."""
    return [list(range(start, start + ep_size)) for start in range(0, world, ep_size)]


def _own_group(partition: list[list[int]]):
    """Create a process group for every block of `partition` (collective: every rank must create
    every group, in the same order) and return the one this rank belongs to."""
    rank, own = dist.get_rank(), None
    for ranks in partition:
        group = dist.new_group(ranks)
        if rank in ranks:
            own = group
    return own


def check_ep_size(ep_size: int, n_experts: int, world_size: int) -> None:
    if ep_size < 1:
        raise EPError(f"parallel.ep_size={ep_size} must be >= 1")
    if n_experts % ep_size:
        raise EPError(f"parallel.ep_size={ep_size} does not divide the routed expert count {n_experts}; "
                      f"choose a divisor of {n_experts}")
    if world_size % ep_size:
        raise EPError(f"parallel.ep_size={ep_size} does not divide the world size {world_size} "
                      f"(ranks = data-parallel size x EP size)")


def build_ep_groups(ep_size: int, n_experts: int | None = None, existing: tuple | None = None) -> EPGroups:
    """Create the EP and EDP process groups (collective: call on every rank, same arguments).

    `existing`: an (EP group, EDP group) pair already made in this layout (an engine's own, so both
    agree); else they are created with `torch.distributed.new_group`."""
    world = dist.get_world_size()
    check_ep_size(ep_size, n_experts if n_experts is not None else ep_size, world)
    if existing is not None:
        ep_group, edp_group = existing
    else:
        ep_group = _own_group(_ep_blocks(world, ep_size))
        edp_group = _own_group([list(range(i, world, ep_size)) for i in range(ep_size)])
    return EPGroups(ep_size=ep_size, ep_rank=dist.get_rank(ep_group), ep_group=ep_group,
                    edp_size=world // ep_size, edp_rank=dist.get_rank(edp_group), edp_group=edp_group,
                    world_size=world)


# ------------------------------------------------------------------------------------ all-to-all
class AllToAll(torch.autograd.Function):
    """Variable-split all_to_all_single whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        x = x.contiguous()
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits,
                               group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        grad = grad.contiguous()
        out = grad.new_empty((sum(input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad, output_split_sizes=input_splits, input_split_sizes=output_splits,
                               group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return AllToAll.apply(x, output_splits, input_splits, group)


def exchange_counts(tokens_per_expert: torch.Tensor, ep_size: int, group) -> torch.Tensor:
    """[E] rows this rank sends to each global expert -> [ep_size, E_local] rows this rank receives
    from each source rank for each of its local experts."""
    send = tokens_per_expert.reshape(ep_size, -1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _regroup_index(counts: torch.Tensor) -> torch.Tensor:
    """counts [S, E_local] of rows laid out (source, expert) -> the index that reorders them
    (expert, source), i.e. grouped by local expert with sources in rank order inside a group."""
    s, e = counts.shape
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat                      # start of block (src, exp)
    block_ids = torch.arange(s * e, device=counts.device).view(s, e).t().reshape(-1)  # (exp, src) order
    lens = flat[block_ids]
    total = int(lens.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=counts.device)
    block_start = starts[block_ids]
    out_starts = torch.cumsum(lens, 0) - lens
    # position j in the regrouped layout -> block b; offset inside it = j - out_starts[b]
    which = torch.repeat_interleave(torch.arange(len(lens), device=counts.device), lens)
    return block_start[which] + (torch.arange(total, device=counts.device) - out_starts[which])


# ----------------------------------------------------------------------------------- EP dispatch
@dataclass
class DispatchPlan:
    """One MoE layer's exchange for one micro-batch: the all-to-all splits (rows this rank sends to
    / receives from each EP rank) and the regrouping of received rows by local expert. Made once,
    after the row counts are exchanged; the dispatch, the local experts and the combine all use it
    (in one go in `ep_routed`, node by node in the paired schedule)."""
    input_splits: list[int]          # rows sent to each EP rank (dispatch), received back (combine)
    output_splits: list[int]         # rows received from each EP rank (dispatch), sent back (combine)
    recv_counts: torch.Tensor        # [ep, E_local] rows received from each source for each local expert
    idx: torch.Tensor                # (source, expert) layout -> grouped by local expert
    inv: torch.Tensor


def plan_dispatch(tokens_per_expert: torch.Tensor, ep_size: int, group) -> DispatchPlan:
    """Exchange the per-expert row counts over `group` (a blocking collective, read on the host)
    -> the plan."""
    recv_counts = exchange_counts(tokens_per_expert, ep_size, group)       # [ep, E_local]
    idx = _regroup_index(recv_counts)
    return DispatchPlan(input_splits=tokens_per_expert.view(ep_size, -1).sum(1).tolist(),
                        output_splits=recv_counts.sum(1).tolist(), recv_counts=recv_counts,
                        idx=idx, inv=inverse_order(idx))


def local_experts(recv: torch.Tensor, plan: DispatchPlan, backend: ExpertsBackend, w_gate_up: torch.Tensor,
                  w_down: torch.Tensor, wgrad_into=None) -> torch.Tensor:
    """Received rows, laid out (source rank, local expert) -> this rank's expert outputs in the same
    layout (ready to be sent back). `wgrad_into`: see `ExpertsBackend`."""
    x_local = permute_rows(recv, plan.idx, plan.inv)
    y = backend.grouped_mlp(x_local, plan.recv_counts.sum(0), w_gate_up, w_down, wgrad_into)
    if x_local.shape[0] == 0 and x_local.requires_grad:
        # No rows for this rank: keep `recv` on the autograd path anyway, so that this rank too runs
        # the reverse all-to-all in backward (the collective needs every rank of the group).
        y = y + 0 * x_local.sum()
    return permute_rows(y, plan.inv, plan.idx)


def ep_routed(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, backend: ExpertsBackend, n_experts: int, ep_size: int, group,
              wgrad_into=None) -> torch.Tensor:
    """The routed path under EP: x [T, H], global topk_idx [T, K], topk_weight [T, K]; local expert
    weights w_gate_up [E_local, H, 2I], w_down [E_local, I, H] -> [T, H] (sum_k w * expert_k(x))."""
    x_sorted, tokens_per_expert, order = permute(x, topk_idx, n_experts)
    plan = plan_dispatch(tokens_per_expert, ep_size, group)
    recv = all_to_all(x_sorted, plan.output_splits, plan.input_splits, group)    # (source, local expert)
    y = local_experts(recv, plan, backend, w_gate_up, w_down, wgrad_into)
    back = all_to_all(y, plan.input_splits, plan.output_splits, group)          # rows as x_sorted
    return unpermute(back, order, topk_weight)


class EPBackend(ExpertsBackend):
    """Wraps an experts backend: `routed` dispatches over the EP group, the inner backend's
    `grouped_mlp` computes the local experts. Installed by `shard_experts`."""

    def __init__(self, inner: ExpertsBackend, n_experts: int, groups: EPGroups):
        self.inner, self.n_experts, self.groups = inner, n_experts, groups
        self.name = f"ep{groups.ep_size}+{inner.name}"

    def grouped_mlp(self, x, tokens_per_expert, w_gate_up, w_down, wgrad_into=None):
        return self.inner.grouped_mlp(x, tokens_per_expert, w_gate_up, w_down, wgrad_into)

    @property
    def local(self) -> ExpertsBackend:
        return self.inner

    def with_local(self, backend: ExpertsBackend) -> ExpertsBackend:
        return EPBackend(backend, self.n_experts, self.groups)

    def routed(self, x, topk_idx, topk_weight, w_gate_up, w_down, wgrad_into=None):
        if self.groups.ep_size == 1:
            return self.inner.routed(x, topk_idx, topk_weight, w_gate_up, w_down, wgrad_into)
        return ep_routed(x, topk_idx, topk_weight, w_gate_up, w_down, self.inner, self.n_experts,
                         self.groups.ep_size, self.groups.ep_group, wgrad_into)


# ------------------------------------------------------------------------------- model sharding
def expert_range(n_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """The routed experts [start, stop) that EP rank `ep_rank` of an EP group of `ep_size` owns:
    the one place this arithmetic lives (loading, sharding and the trainer's layout use it)."""
    n_local = n_experts // ep_size
    return ep_rank * n_local, (ep_rank + 1) * n_local


def shard_experts(model: nn.Module, groups: EPGroups) -> tuple[int, int]:
    """Make every MoE layer of `model` expert-parallel: keep only this rank's experts (a model
    holding all experts is sliced; one loaded with `load_hf_checkpoint(expert_range=...)` must
    already hold exactly this rank's range), install the EP dispatch and mark the expert params
    (`moe.experts.is_expert_param`). Returns the global expert range [start, stop) of this rank."""
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    if not experts:
        raise EPError("shard_experts: the model has no MoE layer")
    n_experts = experts[0].n_experts
    check_ep_size(groups.ep_size, n_experts, groups.world_size)
    start, stop = expert_range(n_experts, groups.ep_size, groups.ep_rank)
    for ex in experts:
        have = ex.expert_range
        if have != (0, n_experts) and have != (start, stop):
            raise EPError(f"shard_experts: rank {dist.get_rank()} (EP rank {groups.ep_rank}) owns experts "
                          f"[{start}, {stop}) but the model holds {have} ({ex.w_gate_up.shape[0]} rows); load with "
                          f"expert_range=({start}, {stop})")
        ex.hold_experts(start, stop)
        ex.dispatch_with(lambda local: EPBackend(local, n_experts, groups))
        ex.mark_expert_params()
    return start, stop


def is_sharded(model: nn.Module) -> bool:
    """Whether `shard_experts` already made the model's experts expert-parallel."""
    return any(isinstance(m, GroupedExperts) and isinstance(m.backend, EPBackend) for m in model.modules())


# --------------------------------------------------------------------------------- reductions
@torch.no_grad()
def allreduce_expert_load(routers, group=None) -> torch.Tensor | None:
    """Sum every router's `expert_load` over `group` (default: the whole world) in place, with one
    collective; returns the stacked global loads [n_layers, E] (None without routers)."""
    routers = list(routers.values()) if isinstance(routers, dict) else list(routers)
    if not routers:
        return None
    loads = torch.stack([r.expert_load for r in routers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(loads, group=group)
        for r, load in zip(routers, loads):
            r.expert_load.copy_(load)
    return loads


def gather_experts(t: torch.Tensor, groups: EPGroups) -> torch.Tensor:
    """Stacked local expert tensor [E_local, ...] -> all experts [E, ...] (all-gather over the EP
    group, in EP-rank order); for export and tests."""
    if groups.ep_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(groups.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=groups.ep_group)
    return torch.cat(parts)


def full_state_dict(model: nn.Module, groups: EPGroups) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert tensor gathered over the EP group (collective: call
    on every rank), in the layout of the unsharded model (checkpoints, HF export)."""
    expert_names = {n for n, p in model.named_parameters() if is_expert_param(p)}
    out = {}
    for name, t in model.state_dict().items():
        out[name] = gather_experts(t.detach(), groups) if name in expert_names else t.detach()
    return out
