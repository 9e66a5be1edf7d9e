"""dots1's router: sigmoid scores, a correction bias used for *selection only*, normalized top-k
weights times the routed scale, and the aux-loss-free bias update (DeepSeek-V3 style).

The parameter/buffer names (`weight`, `e_score_correction_bias`) are those of transformers'
`Dots1TopkRouter`, so checkpoints load without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.dispatch import expert_counts


FP32_BUFFERS = ("e_score_correction_bias", "expert_load")  # fp32 whatever the model's dtype


class Router(nn.Module):
    def __init__(self, hidden_size: int, n_experts: int, top_k: int, routed_scaling_factor: float,
                 norm_topk_prob: bool = True):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.routed_scaling_factor, self.norm_topk_prob = routed_scaling_factor, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        # fp32 in the released checkpoints, and kept fp32 by every cast (`_apply`)
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last bias update (not saved in HF checkpoints).
        self.register_buffer("expert_load", torch.zeros(n_experts, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        """Casts and moves of the model (`.to(dtype)`, `.bfloat16()`, `to_empty`) leave the correction
        bias and the load counters fp32, with their values: bias steps of 1e-3 vanish in bf16 near
        1.0. The one place this rule lives."""
        before = {name: getattr(self, name) for name in FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                new.data = old.to(device=new.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_idx [T, K] int64, topk_weight [T, K] fp32, scores [T, E] fp32).

        Logits, scores and weights are fp32 whatever the compute dtype of x and the weight (the
        mixed-precision policy): a bf16 sigmoid near its tails would blur the top-k choice."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid()
        with torch.no_grad():
            choice = scores + self.e_score_correction_bias.float()
            topk_idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False).indices
        topk_weight = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.routed_scaling_factor
        if self.training and not _recomputing():
            with torch.no_grad():
                self.expert_load += expert_counts(topk_idx, self.n_experts).float()
        return topk_idx, topk_weight, scores

    @torch.no_grad()
    def update_bias(self, rate: float, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing: push the bias of overloaded experts down and of underloaded
        ones up by `rate` (sign of the load error). `load` defaults to this rank's counts; the
        trainer passes globally all-reduced counts under data/expert parallelism."""
        load = self.expert_load if load is None else load
        if rate > 0:  # no step without load (no host read: the condition stays on the device)
            self.e_score_correction_bias += rate * torch.sign(load.mean() - load) * (load.sum() > 0)
        self.expert_load.zero_()


def _recomputing() -> bool:
    """Whether this forward is activation checkpointing's replay inside the backward (eager): its
    tokens were counted in the first pass. Compiled layers do not replay the count (see
    Dots1ForCausalLM.compile_layers)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def sequence_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, sum_i f_i * P_i averaged over sequences.

    scores [B*S, E] (sigmoid), topk_idx [B*S, K]. f_i = E/(K*S) * #tokens of the sequence routed to i;
    P_i = mean over the sequence of the scores normalized per token.
    """
    n_experts = scores.shape[-1]
    s = scores.view(batch, -1, n_experts)
    seq_len = s.shape[1]
    probs = s / (s.sum(-1, keepdim=True) + 1e-20)
    counts = torch.zeros(batch, n_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, topk_idx.view(batch, -1), torch.ones_like(topk_idx.view(batch, -1), dtype=scores.dtype))
    f = counts * n_experts / (top_k * seq_len)
    return (f * probs.mean(1)).sum(-1).mean()
