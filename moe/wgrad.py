"""Weight gradients added straight into fp32 accumulators (Megatron's
`gradient_accumulation_fusion`): the backward of a layer adds its weight gradient into a tensor the
trainer owns (a "main grad": the fp32 master's `.grad`) instead of handing autograd a bf16 `.grad`.

A weight-gradient GEMM that accumulates must write the accumulator without autograd seeing a
mutation of it. The accumulator is an input of the layer's forward op (so that the backward can
reach it, also in a compiled graph, where AOTAutograd saves it like any input the backward reads),
and a second micro-batch's forward may run before the first one's backward (the paired 1F1B
schedule): a declared in-place update in the first backward bumps the accumulator's version
counter and the second backward's saved copy then fails autograd's check, eager and compiled
alike. So the backward ops declare no mutation and write through `untracked_alias` (same memory, a
version counter of its own); they always return a gradient the graph uses, so a compiler never
drops them. Nothing else in a graph reads an accumulator: the trainer reads it after the backward.
"""
from __future__ import annotations

import torch


def can_accumulate(x: torch.Tensor) -> bool:
    """Whether a layer fed `x` may add its weight gradient into an accumulator: only when its
    backward returns `x`'s gradient, an output the graph uses (otherwise a compiler could drop the
    op, and the add with it); if not, the weight gets its `.grad` as usual."""
    return torch.is_grad_enabled() and x.requires_grad


def untracked_alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over `t`'s memory (same shape, strides, offset) whose in-place updates autograd does
    not track on `t`: call only inside a custom op's implementation."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(),
                                                                 t.shape, t.stride())
