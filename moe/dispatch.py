"""Dropless token dispatch on one rank: sort the (token, expert) pairs by expert, run the experts
over contiguous groups, gather back and combine with the routing weights. No capacity, no drops.

Nothing here waits on the GPU: expert counts come from a scatter-add (`torch.bincount` sizes its
output from the data and so syncs with the host on CUDA), and both directions are gathers whose
backward is a gather too (deterministic: no atomic scatter-adds of activations). Under
`torch.compile` the gather, the weighting and the sum over the K slots fuse into one kernel each.
Expert parallelism (all-to-all with variable splits) builds on these functions.
"""
from __future__ import annotations

import torch


def expert_counts(flat_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows per expert [E] (int64) of a flat expert-index tensor, without a host sync."""
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat_idx.device)
    return counts.scatter_add_(0, flat_idx.reshape(-1), torch.ones_like(flat_idx.reshape(-1)))


def sort_by_expert(topk_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_idx [T, K] -> (order [T*K], tokens_per_expert [E]). `order[j]` is the flat (token*K + slot)
    index that lands at grouped row j; the sort is stable, so tokens keep their order inside an
    expert's group (deterministic results)."""
    flat = topk_idx.reshape(-1)
    return torch.argsort(flat, stable=True), expert_counts(flat, n_experts)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `order` (inv[order[j]] = j)."""
    inv = torch.empty_like(order)
    return inv.scatter_(0, order, torch.arange(order.numel(), device=order.device, dtype=order.dtype))


class _GatherTokens(torch.autograd.Function):
    """x [T, H] -> rows x[order[j] // K] [T*K, H]; backward gathers the rows back to (token, slot)
    and sums over the K slots (no atomic index_put)."""

    @staticmethod
    def forward(ctx, x, order, inv, top_k):
        ctx.save_for_backward(inv)
        ctx.top_k = top_k
        return x.index_select(0, torch.div(order, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        g = grad.index_select(0, inv)
        return g.view(g.shape[0] // ctx.top_k, ctx.top_k, g.shape[-1]).sum(1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """rows[idx] for a permutation idx; backward gathers with the inverse permutation (autograd's own
    index_select backward is an index_add, a scatter that costs as much as a GEMM here)."""

    @staticmethod
    def forward(ctx, rows, idx, inv):
        ctx.save_for_backward(inv)
        return rows.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


def permute_rows(rows: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor | None = None) -> torch.Tensor:
    """rows[idx] for a permutation `idx` (its inverse `inv` if known), with a gather backward."""
    return _PermuteRows.apply(rows, idx, inverse_order(idx) if inv is None else inv)


def permute(x: torch.Tensor, topk_idx: torch.Tensor, n_experts: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], topk_idx [T, K] -> (x grouped by expert [T*K, H], tokens_per_expert [E], order [T*K])."""
    order, tokens_per_expert = sort_by_expert(topk_idx, n_experts)
    return _GatherTokens.apply(x, order, inverse_order(order), topk_idx.shape[1]), tokens_per_expert, order


def unpermute(y_grouped: torch.Tensor, order: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute` plus the weighted combine: sum_k w[t,k] * y[t,k] as [T, H] in y's dtype
    (the products are summed in fp32)."""
    n_tokens, top_k = topk_weight.shape
    y = permute_rows(y_grouped, inverse_order(order), order).view(n_tokens, top_k, y_grouped.shape[-1])
    weighted = y * topk_weight.unsqueeze(-1).to(y.dtype)
    return weighted.sum(1, dtype=torch.float32).to(y_grouped.dtype)
