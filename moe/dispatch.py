"""Dropless token dispatch on one rank: sort the (token, expert) pairs by expert, run the experts
over contiguous groups, scatter back and combine with the routing weights. No capacity, no drops.

Expert parallelism (all-to-all with variable splits) builds on these two functions.
"""
from __future__ import annotations

import torch


def permute(x: torch.Tensor, topk_idx: torch.Tensor, n_experts: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], topk_idx [T, K] -> (x grouped by expert [T*K, H], tokens_per_expert [E], order [T*K]).

    `order[j]` is the flat (token*K + slot) index that landed at row j; the sort is stable so
    tokens keep their order inside an expert's group (deterministic results).
    """
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens_per_expert = torch.bincount(flat, minlength=n_experts)
    return x[order // topk_idx.shape[1]], tokens_per_expert, order


def unpermute(y_grouped: torch.Tensor, order: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute` plus the weighted combine: returns sum_k w[t,k] * y[t,k] as [T, H]."""
    n_tokens, top_k = topk_weight.shape
    y = torch.empty_like(y_grouped)
    y[order] = y_grouped
    y = y.view(n_tokens, top_k, -1)
    return (y.float() * topk_weight.unsqueeze(-1).float()).sum(1).to(y_grouped.dtype)
