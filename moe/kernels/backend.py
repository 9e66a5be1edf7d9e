"""The `triton` experts backend: fused Triton kernels for the routed SwiGLU experts (see grouped.py).

Importing this module registers the backend; it raises ImportError when Triton is missing, which
`moe.experts.get_backend` swallows.

`routed(x, topk_idx, topk_weight, w_gate_up, w_down)`:
  forward  1. sort the (token, slot) pairs by expert (argsort + bincount; no host sync)
           2. gate/up grouped GEMM gathering token rows in its loads, SwiGLU in the epilogue
           3. down grouped GEMM, routing weight in the epilogue, rows stored at their (token, slot)
              place; the K slots of a token are summed (fp32 accumulation)
  backward 1. dy[tok] @ Wd^T with SwiGLU backward, routing-weight gradient and w*h in the epilogue
           2. dx: dgu @ Wgu^T scattered to (token, slot), summed over slots
           3. dWgu = x[tok]^T dgu and dWd = (w*h)^T dy[tok], per expert (gathers fused)
`grouped_mlp` runs the same kernels with no gather, no weight and no scatter.
"""
from __future__ import annotations

import torch

import triton  # noqa: F401  (ImportError here = backend unavailable)

from moe.experts import ExpertsBackend, TorchLoopBackend, register_backend
from moe.kernels import grouped as G


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_sorted, w_gate_up, w_down, tok, pos, counts, top_k, n_tokens):
        M = tok.shape[0] if tok is not None else x.shape[0]
        E, H, two_i = w_gate_up.shape
        save = any(ctx.needs_input_grad[:4])
        h, gu = G.gate_up_fwd(x, tok, w_gate_up, counts, M, save_gu=save)
        I = two_i // 2
        wd_strides = (w_down.stride(0), w_down.stride(1), w_down.stride(2))
        if pos is not None:
            ybuf = torch.empty(n_tokens * top_k, H, device=x.device, dtype=x.dtype)
            G.rows_gemm(h, w_down, wd_strides, H, I, counts, ybuf, scale=w_sorted, pos=pos)
            out = ybuf.view(n_tokens, top_k, H).sum(1) if top_k > 1 else ybuf
        else:
            out = torch.empty(M, H, device=x.device, dtype=x.dtype)
            G.rows_gemm(h, w_down, wd_strides, H, I, counts, out, scale=w_sorted)
        # unweighted rows (grouped_mlp): the backward's Wd gradient needs h itself; keep it
        ctx.save_for_backward(x, w_sorted, w_gate_up, w_down, tok, pos, counts, gu,
                              h if (w_sorted is None and save) else None)
        ctx.top_k, ctx.n_tokens, ctx.M = top_k, n_tokens, M
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w_sorted, w_gate_up, w_down, tok, pos, counts, gu, h = ctx.saved_tensors
        need_x, need_w, need_gu, need_d = ctx.needs_input_grad[:4]
        M, top_k, n_tokens = ctx.M, ctx.top_k, ctx.n_tokens
        E, H, two_i = w_gate_up.shape
        dout = dout.contiguous()
        dgu, hw, dw = G.down_bwd(dout, tok, w_down, gu, w_sorted, counts, M)
        if hw is None:
            hw = h
        dx = dWgu = dWd = None
        if need_x:
            gu_strides = (w_gate_up.stride(0), w_gate_up.stride(2), w_gate_up.stride(1))  # B_e = Wgu_e^T
            if pos is not None:
                dxbuf = torch.empty(n_tokens * top_k, H, device=x.device, dtype=x.dtype)
                G.rows_gemm(dgu, w_gate_up, gu_strides, H, two_i, counts, dxbuf, pos=pos)
                dx = dxbuf.view(n_tokens, top_k, H).sum(1) if top_k > 1 else dxbuf
            else:
                dx = torch.empty(M, H, device=x.device, dtype=x.dtype)
                G.rows_gemm(dgu, w_gate_up, gu_strides, H, two_i, counts, dx)
        if need_gu:
            dWgu = G.wgrad(x, tok, dgu, None, counts, torch.empty_like(w_gate_up))
        if need_d:
            dWd = G.wgrad(hw, None, dout, tok, counts, torch.empty_like(w_down))
        if not need_w or w_sorted is None:
            dw = None
        else:
            dw = dw.to(w_sorted.dtype)
        return dx, dw, dWgu, dWd, None, None, None, None, None


def _usable(t: torch.Tensor) -> bool:
    return t.is_cuda or G.INTERPRET


@register_backend
class TritonBackend(ExpertsBackend):
    """Fused Triton kernels (moe/kernels/grouped.py); CPU tensors run under Triton's interpreter."""
    name = "triton"

    def grouped_mlp(self, x, tokens_per_expert, w_gate_up, w_down):
        if not _usable(x):
            return TorchLoopBackend().grouped_mlp(x, tokens_per_expert, w_gate_up, w_down)
        w_gate_up, w_down = w_gate_up.contiguous(), w_down.contiguous()
        x = x.to(w_gate_up.dtype).contiguous()
        counts = tokens_per_expert.to(device=x.device, dtype=torch.int32)
        return _GroupedSwiGLU.apply(x, None, w_gate_up, w_down, None, None, counts, 1, x.shape[0])

    def routed(self, x, topk_idx, topk_weight, w_gate_up, w_down):
        if not _usable(x):
            return TorchLoopBackend().routed(x, topk_idx, topk_weight, w_gate_up, w_down)
        n_tokens, top_k = topk_idx.shape
        E = w_gate_up.shape[0]
        w_gate_up, w_down = w_gate_up.contiguous(), w_down.contiguous()
        out_dtype = x.dtype
        x = x.to(w_gate_up.dtype).contiguous()
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)[:E].to(torch.int32)
        tok = (order // top_k).to(torch.int32)
        w_sorted = topk_weight.reshape(-1)[order]
        out = _GroupedSwiGLU.apply(x, w_sorted, w_gate_up, w_down, tok, order.to(torch.int32), counts,
                                   top_k, n_tokens)
        return out.to(out_dtype)
