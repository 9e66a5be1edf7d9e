"""The paired 1F1B schedule (`parallel.a2a_overlap`): the forward of micro-batch i+1 and the
backward of micro-batch i run interleaved, layer by layer, so that each one's expert all-to-all
(dispatch, combine) runs while the other computes. docs/overlap.md draws it and says why.

The model is cut into *units*: each decoder layer, then the head (final norm, LM head, loss).
A unit whose experts are spread over an expert-parallel group (EP > 1) has four nodes:

    A  attention block + router + sort by expert + shared experts   (compute; `DecoderLayer.moe_front`)
    D  dispatch all-to-all                                           (communication)
    E  the local experts                                             (compute; `DecoderLayer.moe_experts`)
    C  combine all-to-all                                            (communication)

and the next unit's A node starts by combining the rows that came back (`DecoderLayer.moe_output`).
Any other unit (a dense layer, an MoE layer under EP 1, the head) is one A node. The layer says
which units split (`DecoderLayer.ep_groups`). Each compute node is its own autograd graph: its
inputs are detached leaves, its backward is an autograd call from its outputs with the gradients
the later nodes produced (`engine.backward_piece`), and the gradients of its leaves go to the
earlier nodes. A node's state is a typed record (`_AttnNode`, `_ExpertsNode`, `_UnitState`); an
output that only an all-to-all read is kept, once that finished, as its autograd edge alone
(`torch.autograd.graph.get_gradient_edge`), so its memory goes as in the plain schedule. The all-to-alls are `moe.a2a.AsyncAllToAll`:
started as soon as their input exists, waited for only when their output is needed.

A step's n >= 2 micro-batches run as: F(0) alone; then for i = 1 .. n-1 the pair (F(i), B(i-1)),
in which forward unit k goes with backward unit U-1-k in this order (Megatron-Core's combined
1F1B order; each communication is started before the compute it hides behind):

    start B.C(b) | F.A(f) | start F.D(f) | B.E(b) | start B.D(b) | F.E(f) | start F.C(f) | B.A(b)

and B(n-1) alone at the end. Two micro-batches are in flight at most: activation memory grows by
at most one micro-batch over the plain schedule.

The arithmetic is that of the plain schedule op for op (same ops on the same values, gradients of
every parameter summed over micro-batches in the same order), so losses, gradients and weights
match it; the tests check it on CPU/gloo.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from anneal.errors import AnnealError
from anneal.model.dots1 import DecoderLayer, Dots1ForCausalLM
from anneal.train.step import StepSums, to_device
from moe import ep
from moe.a2a import AsyncAllToAll

Tensor = torch.Tensor


@dataclass
class _Unit:
    layer: DecoderLayer | None               # None: the head
    groups: ep.EPGroups | None = None        # set when the unit is split by an EP all-to-all

    @property
    def split(self) -> bool:
        return self.groups is not None


@dataclass
class _Boundary:
    """What crosses from one unit to the next: the hidden state and, after a split unit, the
    combine's inputs besides the order (the rows back from the experts, their weights, the shared
    experts' output). Forward: the next A node's input leaves; backward: their gradients, which go
    back to the unit that produced them."""
    h: Tensor | None = None
    back: Tensor | None = None
    topk_weight: Tensor | None = None
    shared: Tensor | None = None

    def gradients(self) -> _Boundary:
        return _Boundary(_grad_of(self.h), _grad_of(self.back), _grad_of(self.topk_weight), _grad_of(self.shared))


@dataclass
class _Carry:
    """A unit's forward output, waiting for the next unit's A node (and for a split unit's D node:
    the rows to send and their counts, taken by the dispatch; then the combine in flight)."""
    h: Tensor
    order: Tensor | None = None
    topk_weight: Tensor | None = None
    shared: Tensor | None = None
    x_sorted: Tensor | None = None
    tokens_per_expert: Tensor | None = None
    back: AsyncAllToAll | None = None


@dataclass
class _AttnNode:
    """An A node: its input leaves, and the outputs its backward starts from (None: not produced).
    `x_sorted` becomes its gradient edge once the dispatch has sent it."""
    leaves: _Boundary
    objective: Tensor | None = None
    h: Tensor | None = None
    x_sorted: Tensor | GradientEdge | None = None
    topk_weight: Tensor | None = None
    shared: Tensor | None = None
    aux: Tensor | None = None

    def roots(self, grads: _Boundary, x_sorted_grad: Tensor | None, n_micro: int) -> tuple[list, list]:
        """(outputs, their gradients) for the node's backward. The loss of the plain schedule is
        (mean + sum of aux losses) / n_micro: both get 1 / n_micro."""
        pairs = [(self.objective, None), (self.h, grads.h), (self.x_sorted, x_sorted_grad),
                 (self.topk_weight, grads.topk_weight), (self.shared, grads.shared)]
        pairs = [(t, g) for t, g in pairs if t is not None and (isinstance(t, GradientEdge) or t.requires_grad)]
        if self.aux is not None and self.aux.requires_grad:
            pairs.append((self.aux, torch.full_like(self.aux, 1.0) / n_micro))
        return [t for t, _ in pairs], [g for _, g in pairs]


@dataclass
class _ExpertsNode:
    """An E node: the rows received (a leaf) and the experts' output, its gradient edge once the
    combine has sent it."""
    recv: Tensor
    rows: Tensor | GradientEdge


@dataclass
class _UnitState:
    """One unit of one micro-batch, from its forward to the end of its backward."""
    attn: _AttnNode | None = None
    experts: _ExpertsNode | None = None
    plan: ep.DispatchPlan | None = None
    in_flight: AsyncAllToAll | None = None    # this unit's D or C all-to-all, forward or backward
    grads: _Boundary = field(default_factory=_Boundary)   # backward: gradients from the next unit
    recv_grad: Tensor | None = None           # backward: gradient of the rows the experts received


@dataclass
class _MicroBatch:
    batch: dict
    units: list[_UnitState]
    layer_inputs: tuple = ()                  # (cos, sin, mask)
    carry: _Carry | None = None               # forward: what the next A node takes
    auxes: list = field(default_factory=list)


def _leaf(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().requires_grad_(t.requires_grad)


def _grad_of(leaf: Tensor | None) -> Tensor | None:
    if leaf is None or not leaf.requires_grad:
        return None
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def _edge(t: Tensor) -> GradientEdge | None:
    """What a node's backward needs of an output that only an all-to-all (now finished) read and no
    backward saves: its autograd edge, so the tensor's memory is freed as in the plain schedule."""
    return get_gradient_edge(t) if t.requires_grad else None


def check_micro_batches(n_micro_per_rank: int, where: str) -> None:
    """The paired schedule needs two micro-batches per step on every rank (one forward to pair with
    another's backward): one clear error at start-up, never a silent fallback."""
    if n_micro_per_rank < 2:
        raise AnnealError(
            f"parallel.a2a_overlap=true pairs the forward of one micro-batch with the backward of another, but {where} "
            f"gives {n_micro_per_rank} micro-batch per rank in a step; lower trainer.micro_batch_size or raise "
            "schedule.batch_tokens so every step has at least 2 per rank, or set parallel.a2a_overlap=false")


class PairedSchedule:
    """Runs a step's micro-batches with the paired schedule; `accumulate` is a drop-in for
    `anneal.train.step.accumulate` (same gradients, same statistics). The model is parallelized
    first (`anneal.parallel.parallelize`, which also makes the EP groups' second communicator for
    the row counts, `moe.ep.counts_group`)."""

    def __init__(self, model: Dots1ForCausalLM, engine):
        self.model, self.engine = model, engine
        self.units = [_Unit(layer, layer.ep_groups) for layer in model.model.layers] + [_Unit(None)]
        self.n_micro = 0

    def _micro_batch(self, batch: dict, device: torch.device) -> _MicroBatch:
        return _MicroBatch(to_device(batch, device), [_UnitState() for _ in self.units])

    def accumulate(self, batches, n_micro: int, n_sources: int, device: torch.device) -> dict:
        check_micro_batches(n_micro, "this step")
        self.n_micro = n_micro
        sums = StepSums(n_sources, device)
        n_units = len(self.units)
        batches = iter(batches)
        prev = self._micro_batch(next(batches), device)
        for u in range(n_units):                                   # the first forward alone
            self._forward_unit(prev, u, sums)
        for _ in range(n_micro - 1):                               # steady state: F(i) with B(i-1)
            cur = self._micro_batch(next(batches), device)
            for k in range(n_units):
                self._pair(cur, k, prev, n_units - 1 - k, sums)
            prev = cur
        for u in reversed(range(n_units)):                         # the last backward alone
            self._backward_unit(prev, u)
        return sums.result()

    # -- the order ------------------------------------------------------------------------------
    def _pair(self, fwd: _MicroBatch, f: int, bwd: _MicroBatch, b: int, sums: StepSums) -> None:
        self._start_combine_backward(bwd, b)
        self._forward_attn(fwd, f, sums)
        self._start_dispatch(fwd, f)
        self._backward_experts(bwd, b)
        self._start_dispatch_backward(bwd, b)
        self._forward_experts(fwd, f)
        self._start_combine(fwd, f)
        self._backward_attn(bwd, b)

    def _forward_unit(self, mb: _MicroBatch, u: int, sums: StepSums) -> None:
        self._forward_attn(mb, u, sums)
        self._start_dispatch(mb, u)
        self._forward_experts(mb, u)
        self._start_combine(mb, u)

    def _backward_unit(self, mb: _MicroBatch, u: int) -> None:
        self._start_combine_backward(mb, u)
        self._backward_experts(mb, u)
        self._start_dispatch_backward(mb, u)
        self._backward_attn(mb, u)

    # -- forward nodes ----------------------------------------------------------------------------
    def _forward_attn(self, mb: _MicroBatch, u: int, sums: StepSums) -> None:
        model, unit = self.model, self.units[u]
        leaves = _Boundary()
        with torch.enable_grad():
            if u == 0:
                ids = mb.batch["input_ids"]
                h, *mb.layer_inputs = model.embed(ids[:, :-1], mb.batch["position_ids"][:, :-1])
            else:
                h = self._layer_input(mb, u, leaves)
            if unit.layer is None:                                      # the head
                losses = model.losses_from_last_layer(h, mb.batch["input_ids"][:, 1:])
                aux = torch.stack(mb.auxes).sum() if mb.auxes else None
                sums.add(mb.batch, losses, aux)
                node = _AttnNode(leaves, objective=losses.mean() / self.n_micro)
            elif unit.split:
                h, x_sorted, tokens_per_expert, order, topk_weight, shared, aux = \
                    model.checkpointed(unit.layer.moe_front, h, *mb.layer_inputs)
                node = _AttnNode(leaves, h=h, x_sorted=x_sorted, topk_weight=topk_weight, shared=shared, aux=aux)
                mb.carry = _Carry(h, order, topk_weight, shared, x_sorted, tokens_per_expert)
            else:
                h = model.checkpointed(unit.layer, h, *mb.layer_inputs)
                node = _AttnNode(leaves, h=h, aux=unit.layer.take_aux_loss())
                mb.carry = _Carry(h)
        if unit.layer is not None and node.aux is not None:
            mb.auxes.append(node.aux)
        mb.units[u].attn = node

    def _layer_input(self, mb: _MicroBatch, u: int, leaves: _Boundary) -> Tensor:
        """The previous unit's output as leaves of this node: its hidden state, or, after a split
        unit, its residual stream and the combine of the expert rows that came back."""
        carry = mb.carry
        leaves.h = _leaf(carry.h)
        if carry.back is None:
            return leaves.h
        leaves.back = carry.back.wait().requires_grad_()
        experts = mb.units[u - 1].experts
        experts.rows = _edge(experts.rows)
        leaves.topk_weight = _leaf(carry.topk_weight)
        leaves.shared = _leaf(carry.shared)
        return self.units[u - 1].layer.moe_output(leaves.h, leaves.back, carry.order, leaves.topk_weight,
                                                  leaves.shared)

    def _all_to_all(self, mb: _MicroBatch, u: int, rows: Tensor, to_experts: bool) -> AsyncAllToAll:
        """Start unit u's all-to-all of `rows`: toward the experts (the dispatch, and the combine's
        backward) or back from them (the combine, and the dispatch's backward)."""
        plan = mb.units[u].plan
        out, inp = (plan.output_splits, plan.input_splits) if to_experts else (plan.input_splits, plan.output_splits)
        return AsyncAllToAll(rows, out, inp, self.units[u].groups.ep_group)

    def _start_dispatch(self, mb: _MicroBatch, u: int) -> None:
        groups = self.units[u].groups
        if groups is None:
            return
        carry, state = mb.carry, mb.units[u]
        state.plan = ep.plan_dispatch(carry.tokens_per_expert, groups.ep_size, ep.counts_group(groups))
        state.in_flight = self._all_to_all(mb, u, carry.x_sorted, to_experts=True)
        carry.tokens_per_expert = carry.x_sorted = None

    def _forward_experts(self, mb: _MicroBatch, u: int) -> None:
        unit, state = self.units[u], mb.units[u]
        if not unit.split:
            return
        recv = state.in_flight.wait().requires_grad_()
        state.in_flight = None
        state.attn.x_sorted = _edge(state.attn.x_sorted)
        with torch.enable_grad():
            rows = self.model.checkpointed(unit.layer.moe_experts, recv, state.plan)
        state.experts = _ExpertsNode(recv, rows)

    def _start_combine(self, mb: _MicroBatch, u: int) -> None:
        if self.units[u].split:
            mb.carry.back = self._all_to_all(mb, u, mb.units[u].experts.rows, to_experts=False)

    # -- backward nodes ---------------------------------------------------------------------------
    def _start_combine_backward(self, mb: _MicroBatch, u: int) -> None:
        if self.units[u].split:
            state = mb.units[u]
            state.in_flight = self._all_to_all(mb, u, state.grads.back, to_experts=True)
            state.grads.back = None

    def _backward_experts(self, mb: _MicroBatch, u: int) -> None:
        if not self.units[u].split:
            return
        state = mb.units[u]
        node, state.experts = state.experts, None
        grad, state.in_flight = state.in_flight.wait(), None
        self.engine.backward_piece([node.rows], [grad], last=False)
        state.recv_grad = _grad_of(node.recv)

    def _start_dispatch_backward(self, mb: _MicroBatch, u: int) -> None:
        if self.units[u].split:
            state = mb.units[u]
            state.in_flight = self._all_to_all(mb, u, state.recv_grad, to_experts=False)
            state.recv_grad = None

    def _backward_attn(self, mb: _MicroBatch, u: int) -> None:
        state = mb.units[u]
        node, state.attn = state.attn, None
        x_sorted_grad = None
        if self.units[u].split:
            x_sorted_grad, state.in_flight, state.plan = state.in_flight.wait(), None, None
        tensors, wanted = node.roots(state.grads, x_sorted_grad, self.n_micro)
        state.grads = _Boundary()
        self.engine.backward_piece(tensors, wanted, last=(u == 0))
        if u > 0:
            mb.units[u - 1].grads = node.leaves.gradients()
