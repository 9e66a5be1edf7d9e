"""Gradient-accumulation fusion (`trainer.grad_accum_fusion`, Megatron's
`gradient_accumulation_fusion`): the weight-gradient GEMM of each dense linear layer adds straight
into the parameter's fp32 accumulator (the native engine's fp32 master `.grad`; under DeepSpeed
ZeRO 1 the bf16 optimizer's fp32 gradient buffer: `deepspeed_compat.fp32_gradient_accumulators`), instead of writing a bf16
gradient that a post-accumulate-grad hook then reads and adds. On CUDA the GEMM is cuBLAS with bf16
operands, fp32 output and beta = 1 (`torch.addmm(acc, dy^T, x, out_dtype=fp32, out=acc)`), so the
micro-batch's weight gradient is never rounded to bf16 and never materialized: 10 bytes of memory
traffic per parameter per micro-batch fewer, and the sum is at least as accurate as the hook's.

Covered: every `nn.Linear` whose weight has an accumulator (attention q/k/v/o, the dense MLP, the
shared experts, the LM head), and the routed experts with the `triton` backend (its weight-gradient
kernels add into the fp32 accumulators in their epilogue: `moe.kernels`). Not covered: the routers
(fp32 logits from their own code), the embedding, norms, and the routed experts with `grouped_mm`
(`torch._grouped_mm` has no accumulating form; their weight gradients go through the hook).

Both ops are custom ops, so `torch.compile` traces them as opaque calls. The backward op
(`anneal::linear_backward_into`) returns the input's gradient and writes the accumulator through an
alias autograd does not track, so that two micro-batches can be in flight (the paired schedule):
`moe.wgrad` says why. The selective recompute policy keeps the forward's output like any matmul's
(anneal.model.recompute)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.experts import GroupedExperts
from moe.wgrad import can_accumulate, untracked_alias


@torch.library.custom_op("anneal::fused_wgrad_linear", mutates_args=())
def fused_wgrad_linear(x: torch.Tensor, weight: torch.Tensor, main_grad: torch.Tensor) -> torch.Tensor:
    """x @ weight^T; the backward adds x^T-weighted output gradients into `main_grad`."""
    return F.linear(x, weight)


@fused_wgrad_linear.register_fake
def _(x, weight, main_grad):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("anneal::linear_backward_into", mutates_args=())
def linear_backward_into(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         main_grad: torch.Tensor) -> torch.Tensor:
    """-> grad_out @ weight (the input's gradient); adds grad_out^T @ x over all leading dimensions
    into `main_grad`, accumulated in its dtype, through an alias autograd does not track (moe.wgrad)."""
    dy, xs = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    acc = untracked_alias(main_grad)
    if acc.is_cuda and dy.dtype != acc.dtype:
        torch.addmm(acc, dy.t(), xs, out_dtype=acc.dtype, out=acc)
    else:  # CPU twin (and same-dtype operands): the product in the accumulator's dtype, then added
        acc.addmm_(dy.t().to(acc.dtype), xs.to(acc.dtype))
    return grad_out @ weight


@linear_backward_into.register_fake
def _(grad_out, x, weight, main_grad):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, weight, main_grad = inputs
    ctx.save_for_backward(x, weight, main_grad)


def _backward(ctx, grad_out):
    x, weight, main_grad = ctx.saved_tensors
    return linear_backward_into(grad_out, x, weight, main_grad), None, None


fused_wgrad_linear.register_autograd(_backward, setup_context=_setup_context)


class FusedWgradLinear(nn.Linear):
    """An `nn.Linear` whose weight gradient goes into `main_grad` (see the module docstring).
    Made by `fuse_weight_gradients` swapping the class of a built layer: same parameters, same
    state dict keys."""

    main_grad: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not can_accumulate(x):
            return super().forward(x)  # the weight's .grad and its hook
        y = fused_wgrad_linear(x, self.weight, self.main_grad)
        return y if self.bias is None else y + self.bias


def describe_fused(fused: list[nn.Parameter]) -> str:
    """The run log's words for the weights `fuse_weight_gradients` routed (both engines' describe)."""
    return f"; {len(fused)} weight gradients accumulate in fp32 inside their GEMMs" if fused else ""


def fuse_weight_gradients(model: nn.Module, accumulators: dict[nn.Parameter, torch.Tensor]) -> list[nn.Parameter]:
    """Route the weight gradients of `model` into their accumulators (`accumulators`: param -> fp32
    tensor of its shape): every plain `nn.Linear` whose weight has one, and the routed experts of
    every MoE layer whose experts backend adds into them in its kernels (`triton`; moe.wgrad).
    Returns the weights so routed (their `.grad` stays None; a tied weight's other uses still reach
    its hook)."""
    fused = []
    for module in model.modules():
        if type(module) is nn.Linear and module.weight in accumulators:
            module.__class__ = FusedWgradLinear
            module.main_grad = accumulators[module.weight]
            fused.append(module.weight)
        elif isinstance(module, GroupedExperts) and module.w_gate_up in accumulators and module.w_down in accumulators:
            if module.accumulate_wgrad_into(accumulators[module.w_gate_up], accumulators[module.w_down]):
                fused += [module.w_gate_up, module.w_down]
    return fused
