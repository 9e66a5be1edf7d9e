"""The dots1 MoE block: router + dropless dispatch + routed experts + shared experts.

Module names match transformers' `Dots1MoE` (`gate`, `experts`, `shared_experts`) so the HF
checkpoint maps onto it with only the per-expert -> stacked reshaping.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.dispatch import permute, unpermute
from moe.ep import DispatchPlan, local_experts
from moe.experts import GroupedExperts
from moe.router import Router, sequence_aux_loss


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); dots1's dense MLP and its shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Dots1MoE(nn.Module):
    def __init__(self, hidden_size: int, n_experts: int, top_k: int, moe_intermediate_size: int,
                 n_shared_experts: int, routed_scaling_factor: float, norm_topk_prob: bool = True,
                 backend: str = "torch", aux_loss_coef: float = 0.0, expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.top_k, self.aux_loss_coef = top_k, aux_loss_coef
        self.gate = Router(hidden_size, n_experts, top_k, routed_scaling_factor, norm_topk_prob)
        self.experts = GroupedExperts(n_experts, hidden_size, moe_intermediate_size, backend, expert_range)
        self.shared_experts = (SwiGLUMLP(hidden_size, moe_intermediate_size * n_shared_experts)
                               if n_shared_experts > 0 else None)
        self.aux_loss: torch.Tensor | None = None  # set on each training forward when aux_loss_coef > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_idx, topk_weight, scores = self.gate(flat)
        if self.training and self.aux_loss_coef > 0:
            self.aux_loss = self.aux_loss_coef * sequence_aux_loss(scores, topk_idx, shape[0], self.top_k)
        out = self.experts(flat, topk_idx, topk_weight)
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def take_aux_loss(self) -> torch.Tensor | None:
        """The balance loss of the last training forward (None without one), cleared so that it is
        counted once."""
        aux, self.aux_loss = self.aux_loss, None
        return aux

    # -- the layer in pieces, for the paired schedule (expert parallelism: the all-to-alls between) --
    def dispatch_inputs(self, x: torch.Tensor):
        """What `forward` computes before the expert all-to-all, with the same arithmetic: route,
        sort the (token, expert) rows by expert, the shared experts, the aux loss.
        -> (x_sorted, tokens_per_expert, order, topk_weight, shared or None, aux or None)."""
        flat = x.reshape(-1, x.shape[-1])
        topk_idx, topk_weight, scores = self.gate(flat)
        aux = None
        if self.training and self.aux_loss_coef > 0:
            aux = self.aux_loss_coef * sequence_aux_loss(scores, topk_idx, x.shape[0], self.top_k)
        x_sorted, tokens_per_expert, order = permute(flat, topk_idx, self.gate.n_experts)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return x_sorted, tokens_per_expert, order, topk_weight, shared, aux

    @staticmethod
    def combine(back: torch.Tensor, order: torch.Tensor, topk_weight: torch.Tensor, shared: torch.Tensor | None,
                shape: torch.Size) -> torch.Tensor:
        """The layer's output from the expert rows that came back (in `x_sorted`'s order)."""
        out = unpermute(back, order, topk_weight).view(shape)
        return out + shared if shared is not None else out

    @property
    def ep_groups(self):
        """The EP groups this layer's rows are dispatched over when its experts are spread over more
        than one rank (`moe.ep.shard_experts`); None: every expert is held here."""
        return self.experts.ep_groups

    def local_experts(self, recv: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The experts this rank holds over the rows it received, laid out (source rank, local
        expert) -> their outputs in the same layout (`moe.ep.local_experts`)."""
        ex = self.experts
        return local_experts(recv, plan, ex.backend.local, ex.w_gate_up, ex.w_down, ex.wgrad_into)


def moe_layers(model: nn.Module) -> list[Dots1MoE]:
    return [m for m in model.modules() if isinstance(m, Dots1MoE)]
