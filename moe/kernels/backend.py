"""The `triton` experts backend: fused Triton kernels for the routed SwiGLU experts (see grouped.py).

`routed(x, topk_idx, topk_weight, w_gate_up, w_down)`:
  forward  1. sort the (token, slot) pairs by expert (argsort + scatter-add counts; no host sync)
           2. gate/up grouped GEMM gathering token rows in its loads, SwiGLU in the epilogue
           3. down grouped GEMM, routing weight in the epilogue, rows stored at their (token, slot)
              place; the K slots of a token are summed (fp32 accumulation, `slot_sum`)
  backward 1. dy[tok] @ Wd^T with SwiGLU backward, routing-weight gradient and w*h (h) in the epilogue
           2. dx: dgu @ Wgu^T scattered to (token, slot), summed over slots
           3. dWgu = x[tok]^T dgu and dWd = (w*h)^T dy[tok], per expert (gathers fused); given fp32
              accumulators (`wgrad_into`), added into them in the epilogue instead (moe.wgrad)
`grouped_mlp` runs the same kernels with no gather, no weight and no scatter.

The forward and the backward are registered as PyTorch custom ops (`moe::triton_experts_fwd`,
`moe::triton_experts_bwd`, joined by `register_autograd`), so `torch.compile` treats them as
opaque calls with known output shapes: Dynamo never traces the launchers or the autotuner (whose
config list it cannot trace), and a compiled decoder layer keeps one graph around them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton  # noqa: F401  (ImportError here = backend unavailable)

from moe.backends import ExpertsBackend, TorchLoopBackend
from moe.dispatch import sort_by_expert
from moe.kernels import grouped as G
from moe.wgrad import can_accumulate, untracked_alias


@torch.library.custom_op("moe::triton_experts_fwd", mutates_args=())
def _experts_fwd(x: Tensor, w_sorted: Optional[Tensor], w_gate_up: Tensor, w_down: Tensor,
                 tok: Optional[Tensor], pos: Optional[Tensor], counts: Tensor, top_k: int, n_tokens: int,
                 save_gu: bool, acc_gu: Optional[Tensor], acc_d: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """-> (out [n_tokens, H] (routed) or [M, H] (grouped rows), gate/up pre-activations [M, 2I] for
    the backward, or an empty tensor when no gradient is needed). `acc_gu`/`acc_d`: fp32
    accumulators the backward adds the weight gradients into (read only there)."""
    M = tok.shape[0] if tok is not None else x.shape[0]
    H, two_i = w_gate_up.shape[1], w_gate_up.shape[2]
    h, gu = G.gate_up_fwd(x, tok, w_gate_up, counts, M, save_gu=save_gu)
    wd_strides = (w_down.stride(0), w_down.stride(1), w_down.stride(2))
    if pos is not None:
        ybuf = torch.empty(n_tokens * top_k, H, device=x.device, dtype=x.dtype)
        G.rows_gemm(h, w_down, wd_strides, H, two_i // 2, counts, ybuf, scale=w_sorted, pos=pos)
        out = G.slot_sum(ybuf, n_tokens, top_k) if top_k > 1 else ybuf
    else:
        out = torch.empty(M, H, device=x.device, dtype=x.dtype)
        G.rows_gemm(h, w_down, wd_strides, H, two_i // 2, counts, out, scale=w_sorted)
    return out, (gu if save_gu else x.new_empty(0))


@_experts_fwd.register_fake
def _(x, w_sorted, w_gate_up, w_down, tok, pos, counts, top_k, n_tokens, save_gu, acc_gu, acc_d):
    M = tok.shape[0] if tok is not None else x.shape[0]
    rows = n_tokens if pos is not None else M
    gu = x.new_empty(M, w_gate_up.shape[2]) if save_gu else x.new_empty(0)
    return x.new_empty(rows, w_gate_up.shape[1]), gu


@torch.library.custom_op("moe::triton_experts_bwd", mutates_args=())
def _experts_bwd(dout: Tensor, x: Tensor, w_sorted: Optional[Tensor], w_gate_up: Tensor, w_down: Tensor,
                 tok: Optional[Tensor], pos: Optional[Tensor], counts: Tensor, gu: Tensor, top_k: int,
                 n_tokens: int, need_x: bool, need_w: bool, need_gu: bool, need_d: bool,
                 acc_gu: Optional[Tensor], acc_d: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, d routing weights (sorted), dWgu, dWd); empty tensors for what is not needed. With
    accumulators, a needed weight gradient is added into its accumulator in the kernel's epilogue,
    through an alias autograd does not track (moe.wgrad), and returned empty."""
    M = tok.shape[0] if tok is not None else x.shape[0]
    H, two_i = w_gate_up.shape[1], w_gate_up.shape[2]
    dout = dout.contiguous()
    dgu, hw, dw = G.down_bwd(dout, tok, w_down, gu, w_sorted, counts, M)  # hw: w*h (h if unweighted)
    dx, dWgu, dWd = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # distinct: outputs may not alias
    if need_x:
        gu_strides = (w_gate_up.stride(0), w_gate_up.stride(2), w_gate_up.stride(1))  # B_e = Wgu_e^T
        if pos is not None:
            dxbuf = torch.empty(n_tokens * top_k, H, device=x.device, dtype=x.dtype)
            G.rows_gemm(dgu, w_gate_up, gu_strides, H, two_i, counts, dxbuf, pos=pos)
            dx = G.slot_sum(dxbuf, n_tokens, top_k) if top_k > 1 else dxbuf
        else:
            dx = torch.empty(M, H, device=x.device, dtype=x.dtype)
            G.rows_gemm(dgu, w_gate_up, gu_strides, H, two_i, counts, dx)
    if need_gu and acc_gu is not None:
        G.wgrad(x, tok, dgu, None, counts, untracked_alias(acc_gu), accumulate=True)
    elif need_gu:
        dWgu = G.wgrad(x, tok, dgu, None, counts, torch.empty_like(w_gate_up))
    if need_d and acc_d is not None:
        G.wgrad(hw, None, dout, tok, counts, untracked_alias(acc_d), accumulate=True)
    elif need_d:
        dWd = G.wgrad(hw, None, dout, tok, counts, torch.empty_like(w_down))
    dw_out = dw.to(w_sorted.dtype) if (need_w and w_sorted is not None and dw is not None) else x.new_empty(0)
    return dx, dw_out, dWgu, dWd


@_experts_bwd.register_fake
def _(dout, x, w_sorted, w_gate_up, w_down, tok, pos, counts, gu, top_k, n_tokens, need_x, need_w, need_gu, need_d,
      acc_gu, acc_d):
    def empty():
        return x.new_empty(0)
    dx = x.new_empty(x.shape) if need_x else empty()
    dw = w_sorted.new_empty(w_sorted.shape) if (need_w and w_sorted is not None) else empty()
    return (dx, dw, w_gate_up.new_empty(w_gate_up.shape) if need_gu and acc_gu is None else empty(),
            w_down.new_empty(w_down.shape) if need_d and acc_d is None else empty())


def _setup_context(ctx, inputs, output):
    x, w_sorted, w_gate_up, w_down, tok, pos, counts, top_k, n_tokens, save_gu, acc_gu, acc_d = inputs
    ctx.save_for_backward(x, w_sorted, w_gate_up, w_down, tok, pos, counts, output[1], acc_gu, acc_d)
    ctx.top_k, ctx.n_tokens = top_k, n_tokens
    ctx.set_materialize_grads(False)  # no zero-filled [M, 2I] gradient for the saved pre-activations


def _backward(ctx, dout, _dgu):
    if dout is None:
        return (None,) * 12
    x, w_sorted, w_gate_up, w_down, tok, pos, counts, gu, acc_gu, acc_d = ctx.saved_tensors
    need_x, need_w, need_gu, need_d = ctx.needs_input_grad[:4]
    dx, dw, dWgu, dWd = _experts_bwd(dout, x, w_sorted, w_gate_up, w_down, tok, pos, counts, gu, ctx.top_k,
                                     ctx.n_tokens, need_x, need_w, need_gu, need_d, acc_gu, acc_d)
    return (dx if need_x else None, dw if need_w else None, dWgu if need_gu and acc_gu is None else None,
            dWd if need_d and acc_d is None else None, None, None, None, None, None, None, None, None)


_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _usable(t: Tensor) -> bool:
    return t.is_cuda or G.INTERPRET


def _accumulators(x: Tensor, wgrad_into) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The (gate/up, down) accumulators to add the weight gradients into, when given and allowed
    (`moe.wgrad.can_accumulate`); (None, None): the weights get their gradients the usual way."""
    return wgrad_into if wgrad_into is not None and can_accumulate(x) else (None, None)


class TritonBackend(ExpertsBackend):
    """Fused Triton kernels (moe/kernels/grouped.py); CPU tensors run under Triton's interpreter."""
    name = "triton"
    accumulates_wgrad = True

    def grouped_mlp(self, x, tokens_per_expert, w_gate_up, w_down, wgrad_into=None):
        if not _usable(x):
            return TorchLoopBackend().grouped_mlp(x, tokens_per_expert, w_gate_up, w_down)
        acc_gu, acc_d = _accumulators(x, wgrad_into)
        w_gate_up, w_down = w_gate_up.contiguous(), w_down.contiguous()
        x = x.to(w_gate_up.dtype).contiguous()
        counts = tokens_per_expert.to(device=x.device, dtype=torch.int32)
        out, _ = _experts_fwd(x, None, w_gate_up, w_down, None, None, counts, 1, x.shape[0],
                              _needs_grad(x, w_gate_up, w_down), acc_gu, acc_d)
        return out

    def routed(self, x, topk_idx, topk_weight, w_gate_up, w_down, wgrad_into=None):
        if not _usable(x):
            return TorchLoopBackend().routed(x, topk_idx, topk_weight, w_gate_up, w_down)
        acc_gu, acc_d = _accumulators(x, wgrad_into)
        n_tokens, top_k = topk_idx.shape
        w_gate_up, w_down = w_gate_up.contiguous(), w_down.contiguous()
        out_dtype = x.dtype
        x = x.to(w_gate_up.dtype).contiguous()
        order, counts = sort_by_expert(topk_idx, w_gate_up.shape[0])
        tok = torch.div(order, top_k, rounding_mode="floor").to(torch.int32)
        w_sorted = topk_weight.reshape(-1)[order]
        out, _ = _experts_fwd(x, w_sorted, w_gate_up, w_down, tok, order.to(torch.int32), counts.to(torch.int32),
                              top_k, n_tokens, _needs_grad(x, w_sorted, w_gate_up, w_down), acc_gu, acc_d)
        return out.to(out_dtype)
