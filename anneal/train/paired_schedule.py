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
Any other unit (a dense layer, an MoE layer under EP 1, the head) is one A node. Each compute
node is its own autograd graph: its inputs are detached leaves, its backward is an autograd call
from its outputs with the gradients the later nodes produced (`engine.backward_piece`), and the
gradients of its leaves go to the earlier nodes. The all-to-alls are `moe.a2a.AsyncAllToAll`:
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

from anneal.errors import AnnealError
from anneal.model.dots1 import Dots1ForCausalLM
from anneal.train.step import StepSums, to_device
from moe import ep
from moe.a2a import AsyncAllToAll
from moe.layer import Dots1MoE


@dataclass
class _Unit:
    layer: torch.nn.Module | None            # None: the head
    experts: ep.EPBackend | None = None      # set when the unit is split by an EP all-to-all

    @property
    def split(self) -> bool:
        return self.experts is not None


@dataclass
class _Node:
    """One compute node of one micro-batch: its input leaves and its outputs, kept for its backward."""
    leaves: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


@dataclass
class _MicroBatch:
    batch: dict
    layer_inputs: tuple = ()                                      # (cos, sin, mask)
    carry: dict = field(default_factory=dict)                     # forward: what the next A node takes
    attn: dict[int, _Node] = field(default_factory=dict)
    experts: dict[int, _Node] = field(default_factory=dict)
    plans: dict[int, ep.DispatchPlan] = field(default_factory=dict)
    in_flight: dict[int, AsyncAllToAll] = field(default_factory=dict)   # per unit: D or C, forward or backward
    grads: dict[int, dict] = field(default_factory=dict)          # backward: gradients of unit u's A outputs
    auxes: list = field(default_factory=list)


def _unit_of(layer) -> _Unit:
    backend = layer.mlp.experts.backend if isinstance(layer.mlp, Dots1MoE) else None
    if isinstance(backend, ep.EPBackend) and backend.groups.ep_size > 1:
        return _Unit(layer, backend)
    return _Unit(layer)


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_(t.requires_grad)


def _grad_of(leaf: torch.Tensor | None) -> torch.Tensor | None:
    if leaf is None or not leaf.requires_grad:
        return None
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def _release(t: torch.Tensor) -> None:
    """Free the memory of a node output that only an all-to-all read (now finished) and no backward
    saves: the tensor stays as the handle its node's backward starts from (autograd checks only its
    shape), as in the plain schedule, where nothing keeps it after the all-to-all."""
    t.untyped_storage().resize_(0)


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
    `anneal.train.step.accumulate` (same gradients, same statistics)."""

    def __init__(self, model: Dots1ForCausalLM, engine):
        self.model, self.engine = model, engine
        self.units = [_unit_of(layer) for layer in model.model.layers] + [_Unit(None)]
        for unit in self.units:  # collective (every rank builds the schedule at the same point)
            if unit.split:
                ep.counts_group(unit.experts.groups)
        self.n_micro = 0

    def accumulate(self, batches, n_micro: int, n_sources: int, device: torch.device) -> dict:
        check_micro_batches(n_micro, "this step")
        self.n_micro = n_micro
        sums = StepSums(n_sources, device)
        n_units = len(self.units)
        batches = iter(batches)
        prev = _MicroBatch(to_device(next(batches), device))
        for u in range(n_units):                                   # the first forward alone
            self._forward_unit(prev, u, sums)
        for _ in range(n_micro - 1):                               # steady state: F(i) with B(i-1)
            cur = _MicroBatch(to_device(next(batches), device))
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
        leaves: dict[str, torch.Tensor] = {}
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
                outputs = {"objective": losses.mean() / self.n_micro}
            elif unit.split:
                h, x_sorted, tokens_per_expert, order, topk_weight, shared, aux = \
                    model.checkpointed(unit.layer.moe_front, h, *mb.layer_inputs)
                outputs = {"h": h, "x_sorted": x_sorted, "topk_weight": topk_weight, "shared": shared, "aux": aux}
                mb.carry = {"h": h, "topk_weight": topk_weight, "shared": shared, "order": order,
                            "tokens_per_expert": tokens_per_expert, "x_sorted": x_sorted}
            else:
                h = model.checkpointed(unit.layer, h, *mb.layer_inputs)
                aux = None
                if isinstance(unit.layer.mlp, Dots1MoE):
                    aux, unit.layer.mlp.aux_loss = unit.layer.mlp.aux_loss, None
                outputs = {"h": h, "aux": aux}
                mb.carry = {"h": h}
        if unit.layer is not None and outputs["aux"] is not None:
            mb.auxes.append(outputs["aux"])
        mb.attn[u] = _Node(leaves, {k: v for k, v in outputs.items() if v is not None})

    def _layer_input(self, mb: _MicroBatch, u: int, leaves: dict) -> torch.Tensor:
        """The previous unit's output as leaves of this node: its hidden state, or, after a split
        unit, its residual stream and the combine of the expert rows that came back."""
        carry = mb.carry
        leaves["h"] = _leaf(carry["h"])
        if "back" not in carry:
            return leaves["h"]
        leaves["back"] = carry["back"].wait().requires_grad_()
        _release(mb.experts[u - 1].outputs["rows"])
        leaves["topk_weight"] = _leaf(carry["topk_weight"])
        leaves["shared"] = _leaf(carry["shared"])
        return self.units[u - 1].layer.moe_output(leaves["h"], leaves["back"], carry["order"], leaves["topk_weight"],
                                                  leaves["shared"])

    def _all_to_all(self, mb: _MicroBatch, u: int, rows: torch.Tensor, to_experts: bool) -> AsyncAllToAll:
        """Start unit u's all-to-all of `rows`: toward the experts (the dispatch, and the combine's
        backward) or back from them (the combine, and the dispatch's backward)."""
        plan = mb.plans[u]
        out, inp = (plan.output_splits, plan.input_splits) if to_experts else (plan.input_splits, plan.output_splits)
        return AsyncAllToAll(rows, out, inp, self.units[u].experts.groups.ep_group)

    def _start_dispatch(self, mb: _MicroBatch, u: int) -> None:
        unit = self.units[u]
        if not unit.split:
            return
        groups = unit.experts.groups
        mb.plans[u] = ep.plan_dispatch(mb.carry.pop("tokens_per_expert"), groups.ep_size, ep.counts_group(groups))
        mb.in_flight[u] = self._all_to_all(mb, u, mb.carry.pop("x_sorted"), to_experts=True)

    def _forward_experts(self, mb: _MicroBatch, u: int) -> None:
        unit = self.units[u]
        if not unit.split:
            return
        recv = mb.in_flight.pop(u).wait().requires_grad_()
        _release(mb.attn[u].outputs["x_sorted"])
        with torch.enable_grad():
            rows = self.model.checkpointed(unit.layer.moe_experts, recv, mb.plans[u], unit.experts.inner)
        mb.experts[u] = _Node({"recv": recv}, {"rows": rows})

    def _start_combine(self, mb: _MicroBatch, u: int) -> None:
        if self.units[u].split:
            mb.carry["back"] = self._all_to_all(mb, u, mb.experts[u].outputs["rows"], to_experts=False)

    # -- backward nodes ---------------------------------------------------------------------------
    def _start_combine_backward(self, mb: _MicroBatch, u: int) -> None:
        if self.units[u].split:
            mb.in_flight[u] = self._all_to_all(mb, u, mb.grads[u].pop("back"), to_experts=True)

    def _backward_experts(self, mb: _MicroBatch, u: int) -> None:
        if not self.units[u].split:
            return
        node = mb.experts.pop(u)
        self.engine.backward_piece([node.outputs["rows"]], [mb.in_flight.pop(u).wait()], last=False)
        mb.grads[u]["recv"] = _grad_of(node.leaves["recv"])

    def _start_dispatch_backward(self, mb: _MicroBatch, u: int) -> None:
        if self.units[u].split:
            mb.in_flight[u] = self._all_to_all(mb, u, mb.grads[u].pop("recv"), to_experts=False)

    def _backward_attn(self, mb: _MicroBatch, u: int) -> None:
        node = mb.attn.pop(u)
        grads = mb.grads.pop(u, {})
        if self.units[u].split:
            grads["x_sorted"] = mb.in_flight.pop(u).wait()
            mb.plans.pop(u)
        tensors, wanted = [], []
        for name, out in node.outputs.items():
            if not out.requires_grad:
                continue
            tensors.append(out)
            # the loss of the plain schedule is (mean + sum of aux losses) / n_micro: both get 1 / n_micro
            wanted.append(None if name == "objective" else
                          torch.full_like(out, 1.0) / self.n_micro if name == "aux" else grads[name])
        self.engine.backward_piece(tensors, wanted, last=(u == 0))
        if u > 0:
            mb.grads[u - 1] = {name: _grad_of(leaf) for name, leaf in node.leaves.items()}
