"""Triton kernels for the routed-expert SwiGLU MLP over rows grouped by expert (dropless, no padding).

Rows are the (token, slot) pairs sorted by expert; expert e owns rows [start_e, start_e + n_e) where
n_e = counts[e]. No kernel needs host-side tile tables: a row-tiled program finds its expert from the
per-expert counts inside the kernel (a cumulative sum over at most E_PAD entries), so nothing syncs
with the host and any number of local experts (EP shares), empty ones included, works.

Kernels (each a plain `@triton.jit` function; `launch_*` picks the configuration):
- `_gate_up_fwd`: h = silu(x[tok] @ Wg) * (x[tok] @ Wu); the token gather is fused into the A loads,
  the SwiGLU into the epilogue; optionally saves the pre-activations for the backward.
- `_rows_gemm`: out[pos[r]] = scale[r] * (A[r] @ B_e); forward down projection (routing weight
  applied, rows scattered to their (token, slot) place) and backward dx (dgu @ Wgu_e^T).
- `_down_bwd`: dh = dy[tok] @ Wd_e^T with the SwiGLU backward and the routing-weight gradient
  (partial dot(dh, h) per column block) in the epilogue; also writes w*h for the Wd gradient.
- `_wgrad`: out_e = A[rows_e]^T @ B[rows_e] (weight gradients; reduction over the expert's rows,
  either operand optionally gathered by token).

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, or automatically when no
CUDA device exists) with one small fixed configuration; on CUDA they are autotuned.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides at import whether kernels are interpreted (TRITON_INTERPRET=1 must be set before
# `import triton`); CPU tensors are only usable in that mode.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_jit = triton.jit
# The interpreter (Triton 3.6-3.9) gets bf16 x bf16 dots wrong: upcast the operands there.
_DOT_F32 = tl.constexpr(INTERPRET)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

@_jit
def _expert_row_tile(pid, counts_ptr, M, E, N, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a program id to (expert e, column block, first row, end of the expert's rows).

    Row tiles are laid out expert after expert (each expert's rows rounded up to BLOCK_M), grouped
    GROUP_M tiles at a time for L2 reuse; the grid has cdiv(M, BLOCK_M) + E row tiles, and programs
    past the last expert's tiles get e >= E (the caller returns)."""
    num_pid_m = tl.cdiv(M, BLOCK_M) + E
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    e_ar = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + e_ar, mask=e_ar < E, other=0).to(tl.int32)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    row_end_all = tl.cumsum(cnt, 0)
    sel = e_ar == e
    n_e = tl.sum(tl.where(sel, cnt, 0), 0)
    start = tl.sum(tl.where(sel, row_end_all - cnt, 0), 0)
    t0 = tl.sum(tl.where(sel, tile_end - tiles, 0), 0)
    row0 = start + (pid_m - t0) * BLOCK_M
    row_end = start + n_e
    return e, pid_n, row0, row_end


@_jit
def _gate_up_fwd(x_ptr, tok_ptr, w_ptr, gu_ptr, h_ptr, counts_ptr,
                 M, E, N, K, ROWS_HINT,
                 stride_xm, stride_we, stride_wk, stride_wn, stride_gum, stride_hm,
                 HAS_GATHER: tl.constexpr, SAVE_GU: tl.constexpr, EVEN_K: tl.constexpr,
                 E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # N = I (per half); w is [E, K=H, 2N]: gate columns [0, N), up columns [N, 2N).
    e, pid_n, row0, row_end = _expert_row_tile(tl.program_id(0), counts_ptr, M, E, N,
                                               E_PAD, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return

    rm = row0 + tl.arange(0, BLOCK_M)
    mrow = rm < row_end
    rm_c = tl.where(mrow, rm, row0)
    if HAS_GATHER:
        src = tl.load(tok_ptr + rm_c).to(tl.int64)
    else:
        src = rm_c.to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = rn % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + src[:, None] * stride_xm + rk[None, :]
    w_base = w_ptr + e.to(tl.int64) * stride_we
    bg_ptrs = w_base + rk[:, None] * stride_wk + rn_c[None, :] * stride_wn
    bu_ptrs = bg_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            bg = tl.load(bg_ptrs)
            bu = tl.load(bu_ptrs)
        else:
            kk = k * BLOCK_K + rk
            a = tl.load(a_ptrs, mask=kk[None, :] < K, other=0.0)
            bg = tl.load(bg_ptrs, mask=kk[:, None] < K, other=0.0)
            bu = tl.load(bu_ptrs, mask=kk[:, None] < K, other=0.0)
        if _DOT_F32:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g)
        acc_u = tl.dot(a, bu, acc_u)
        a_ptrs += BLOCK_K
        bg_ptrs += BLOCK_K * stride_wk
        bu_ptrs += BLOCK_K * stride_wk

    out_dtype = h_ptr.dtype.element_ty
    mask = mrow[:, None] & (rn[None, :] < N)
    rm64 = rm.to(tl.int64)
    if SAVE_GU:
        g_ptrs = gu_ptr + rm64[:, None] * stride_gum + rn[None, :]
        tl.store(g_ptrs, acc_g.to(out_dtype), mask=mask)
        tl.store(g_ptrs + N, acc_u.to(out_dtype), mask=mask)
        # the backward recomputes h from the rounded pre-activations; do the same here
        acc_g = acc_g.to(out_dtype).to(tl.float32)
        acc_u = acc_u.to(out_dtype).to(tl.float32)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + rm64[:, None] * stride_hm + rn[None, :], h.to(out_dtype), mask=mask)


@_jit
def _rows_gemm(a_ptr, b_ptr, out_ptr, counts_ptr, scale_ptr, pos_ptr,
               M, E, N, K, ROWS_HINT,
               stride_am, stride_be, stride_bk, stride_bn, stride_om,
               HAS_SCALE: tl.constexpr, HAS_SCATTER: tl.constexpr, EVEN_K: tl.constexpr,
               E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # out[pos[r], :] = scale[r] * (A[r, :] @ B[e]) for the rows r of expert e (A rows sorted).
    e, pid_n, row0, row_end = _expert_row_tile(tl.program_id(0), counts_ptr, M, E, N,
                                               E_PAD, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return

    rm = row0 + tl.arange(0, BLOCK_M)
    mrow = rm < row_end
    rm_c = tl.where(mrow, rm, row0).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = rn % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm_c[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + rk[:, None] * stride_bk + rn_c[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kk = k * BLOCK_K + rk
            a = tl.load(a_ptrs, mask=kk[None, :] < K, other=0.0)
            b = tl.load(b_ptrs, mask=kk[:, None] < K, other=0.0)
        if _DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk

    if HAS_SCALE:
        s = tl.load(scale_ptr + rm_c).to(tl.float32)
        acc = acc * s[:, None]
    if HAS_SCATTER:
        dst = tl.load(pos_ptr + rm_c).to(tl.int64)
    else:
        dst = rm.to(tl.int64)
    mask = mrow[:, None] & (rn[None, :] < N)
    tl.store(out_ptr + dst[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _down_bwd(dy_ptr, tok_ptr, wd_ptr, gu_ptr, scale_ptr, dgu_ptr, hw_ptr, dwp_ptr, counts_ptr,
              M, E, N, K, ROWS_HINT, N_DWP,
              stride_dym, stride_we, stride_wn, stride_wk, stride_gum, stride_dgum, stride_hwm, stride_dwpm,
              HAS_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
              E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # dh_unw[r, i] = sum_k dy[tok[r], k] * Wd[e][i, k]  (N = I, K = H)
    e, pid_n, row0, row_end = _expert_row_tile(tl.program_id(0), counts_ptr, M, E, N,
                                               E_PAD, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return

    rm = row0 + tl.arange(0, BLOCK_M)
    mrow = rm < row_end
    rm_c = tl.where(mrow, rm, row0)
    if HAS_GATHER:
        src = tl.load(tok_ptr + rm_c).to(tl.int64)
    else:
        src = rm_c.to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = rn % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + src[:, None] * stride_dym + rk[None, :]
    b_ptrs = wd_ptr + e.to(tl.int64) * stride_we + rk[:, None] * stride_wk + rn_c[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kk = k * BLOCK_K + rk
            a = tl.load(a_ptrs, mask=kk[None, :] < K, other=0.0)
            b = tl.load(b_ptrs, mask=kk[:, None] < K, other=0.0)
        if _DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk

    rm64 = rm.to(tl.int64)
    mask = mrow[:, None] & (rn[None, :] < N)
    g_ptrs = gu_ptr + rm64[:, None] * stride_gum + rn[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    h = silu * u
    out_dtype = dgu_ptr.dtype.element_ty
    if HAS_SCALE:
        s = tl.load(scale_ptr + rm_c).to(tl.float32)
        part = tl.sum(tl.where(mask, acc * h, 0.0), 1)
        # dwp has one column per 16 columns of I; this program owns BLOCK_N // 16 of them: its partial
        # goes in the first, zeros in the rest, so every column is written whatever the config
        # (the autotuner runs several configs on the same buffer)
        SUB: tl.constexpr = BLOCK_N // 16
        sub = tl.arange(0, SUB)
        cols = pid_n * SUB + sub
        vals = tl.where(sub[None, :] == 0, part[:, None], 0.0)
        tl.store(dwp_ptr + rm64[:, None] * stride_dwpm + cols[None, :], vals,
                 mask=mrow[:, None] & (cols[None, :] < N_DWP))
        dh = acc * s[:, None]
        hw = h * s[:, None]
        tl.store(hw_ptr + rm64[:, None] * stride_hwm + rn[None, :], hw.to(hw_ptr.dtype.element_ty), mask=mask)
    else:
        dh = acc  # unweighted rows: the Wd gradient uses the h saved by the forward
    du = dh * silu
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    d_ptrs = dgu_ptr + rm64[:, None] * stride_dgum + rn[None, :]
    tl.store(d_ptrs, dg.to(out_dtype), mask=mask)
    tl.store(d_ptrs + N, du.to(out_dtype), mask=mask)


@_jit
def _wgrad(a_ptr, atok_ptr, b_ptr, btok_ptr, out_ptr, counts_ptr,
           E, P, Q, ROWS_HINT,
           stride_am, stride_bm, stride_oe, stride_op, stride_oq,
           A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, E_PAD: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # out[e][p, q] = sum_{r in rows of e} A[ra(r), p] * B[rb(r), q]
    pid = tl.program_id(0)
    num_pid_p = tl.cdiv(P, BLOCK_M)
    num_pid_q = tl.cdiv(Q, BLOCK_N)
    per_e = num_pid_p * num_pid_q
    e = pid // per_e
    pid = pid % per_e
    group = GROUP_M * num_pid_q
    first_p = (pid // group) * GROUP_M
    size_p = min(num_pid_p - first_p, GROUP_M)
    pid_p = first_p + (pid % group) % size_p
    pid_q = (pid % group) // size_p

    e_ar = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + e_ar, mask=e_ar < E, other=0).to(tl.int32)
    row_end_all = tl.cumsum(cnt, 0)
    sel = e_ar == e
    n_e = tl.sum(tl.where(sel, cnt, 0), 0)
    start = tl.sum(tl.where(sel, row_end_all - cnt, 0), 0)
    end = start + n_e

    rp = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    rq = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    rp_c = rp % P
    rq_c = rq % Q
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rr = r0 + rk
        mr = rr < end
        rr_c = tl.where(mr, rr, start)
        if A_GATHER:
            ra = tl.load(atok_ptr + rr_c).to(tl.int64)
        else:
            ra = rr_c.to(tl.int64)
        if B_GATHER:
            rb = tl.load(btok_ptr + rr_c).to(tl.int64)
        else:
            rb = rr_c.to(tl.int64)
        a = tl.load(a_ptr + ra[None, :] * stride_am + rp_c[:, None], mask=mr[None, :], other=0.0)
        b = tl.load(b_ptr + rb[:, None] * stride_bm + rq_c[None, :], mask=mr[:, None], other=0.0)
        if _DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)

    mask = (rp[:, None] < P) & (rq[None, :] < Q)
    o_ptrs = out_ptr + e.to(tl.int64) * stride_oe + rp[:, None] * stride_op + rq[None, :] * stride_oq
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------

def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# Hopper (H100/H200) candidates; BLOCK_N of the gate/up kernel is per half (two accumulators).
_GATE_UP_CONFIGS = [
    _cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
]
_ROWS_CONFIGS = [
    _cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 4, 4), _cfg(64, 256, 64, 4, 4),
]
_DOWN_BWD_CONFIGS = [
    _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
]
_WGRAD_CONFIGS = [
    _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 32, 4, 4), _cfg(128, 128, 32, 4, 6), _cfg(128, 256, 32, 8, 4),
    _cfg(128, 128, 64, 4, 3),
]
# the interpreter: one small configuration (tl.dot needs every dimension >= 16)
_INTERP = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}

_SMEM_LIMIT = 220 * 1024


def _pruner(first_arg: str, n_b: int):
    """Drop configs whose pipelined A/B tiles exceed shared memory (fp32 inputs); keep one that fits."""
    def prune(configs, named_args, **kwargs):
        esize = named_args[first_arg].element_size()
        def smem(c):
            k = c.kwargs
            return (k["BLOCK_M"] * k["BLOCK_K"] + n_b * k["BLOCK_K"] * k["BLOCK_N"]) * esize * c.num_stages
        kept = [c for c in configs if smem(c) <= _SMEM_LIMIT]
        return kept or [_cfg(64, 64, 32, 4, 2)]
    return prune


_KEYS = ["N", "K", "ROWS_HINT"]
if INTERPRET:
    _k_gate_up, _k_rows, _k_down_bwd, _k_wgrad = _gate_up_fwd, _rows_gemm, _down_bwd, _wgrad
else:
    def _tuned(configs, keys, first_arg, n_b):
        return triton.autotune(configs, key=keys, prune_configs_by={"early_config_prune": _pruner(first_arg, n_b)})
    _k_gate_up = _tuned(_GATE_UP_CONFIGS, _KEYS, "x_ptr", 2)(_gate_up_fwd)
    _k_rows = _tuned(_ROWS_CONFIGS, _KEYS, "a_ptr", 1)(_rows_gemm)
    _k_down_bwd = _tuned(_DOWN_BWD_CONFIGS, _KEYS, "dy_ptr", 1)(_down_bwd)
    _k_wgrad = _tuned(_WGRAD_CONFIGS, ["P", "Q", "ROWS_HINT"], "a_ptr", 1)(_wgrad)


def _meta():
    return dict(_INTERP) if INTERPRET else {}


def _e_pad(E: int) -> int:
    return max(16, triton.next_power_of_2(E))


def _rows_hint(M: int, E: int) -> int:
    """Autotune key: log2 bucket of the mean rows per expert."""
    return max(0, (max(M, 1) // max(E, 1)).bit_length())


def _grid_rows(M, E, N):
    return lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)


# ----------------------------------------------------------------------------------------------
# launchers (all tensors contiguous; counts int32 [E]; tok/pos int32 [M])
# ----------------------------------------------------------------------------------------------

def gate_up_fwd(x, tok, w_gate_up, counts, M, save_gu: bool):
    E, H, two_i = w_gate_up.shape
    N = two_i // 2
    h = torch.empty(M, N, device=x.device, dtype=x.dtype)
    gu = torch.empty(M, two_i, device=x.device, dtype=x.dtype) if save_gu else h
    if M == 0:
        return h, (gu if save_gu else None)
    _k_gate_up[_grid_rows(M, E, N)](
        x, tok if tok is not None else counts, w_gate_up, gu, h, counts,
        M, E, N, H, _rows_hint(M, E),
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), gu.stride(0), h.stride(0),
        HAS_GATHER=tok is not None, SAVE_GU=save_gu, EVEN_K=_even_k(H),
        E_PAD=_e_pad(E), **_meta())
    return h, (gu if save_gu else None)


def rows_gemm(a, b, b_strides, N, K, counts, out, scale=None, pos=None):
    """out[pos[r]] = scale[r] * a[r] @ B_e, B_e given by (stride_e, stride_k, stride_n) over b."""
    M = a.shape[0]
    E = counts.shape[0]
    if M == 0:
        return out
    _k_rows[_grid_rows(M, E, N)](
        a, b, out, counts, scale if scale is not None else a, pos if pos is not None else counts,
        M, E, N, K, _rows_hint(M, E),
        a.stride(0), b_strides[0], b_strides[1], b_strides[2], out.stride(0),
        HAS_SCALE=scale is not None, HAS_SCATTER=pos is not None, EVEN_K=_even_k(K),
        E_PAD=_e_pad(E), **_meta())
    return out


def down_bwd(dy, tok, w_down, gu, scale, counts, M):
    """-> (dgu [M, 2I], w*h [M, I] or None when scale is None, routing-weight grad [M] fp32 or None)."""
    E, I, H = w_down.shape
    dgu = torch.empty(M, 2 * I, device=dy.device, dtype=dy.dtype)
    hw = torch.empty(M, I, device=dy.device, dtype=dy.dtype) if scale is not None else None
    if M == 0:
        return dgu, hw, (torch.zeros(0, device=dy.device, dtype=torch.float32) if scale is not None else None)
    n_dwp = triton.cdiv(I, 16)
    dwp = torch.empty(M, n_dwp, device=dy.device, dtype=torch.float32) if scale is not None else None
    _k_down_bwd[_grid_rows(M, E, I)](
        dy, tok if tok is not None else counts, w_down, gu, scale if scale is not None else gu, dgu,
        hw if hw is not None else dgu, dwp if dwp is not None else dgu, counts,
        M, E, I, H, _rows_hint(M, E), n_dwp,
        dy.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), gu.stride(0), dgu.stride(0),
        hw.stride(0) if hw is not None else 0, dwp.stride(0) if dwp is not None else 0,
        HAS_GATHER=tok is not None, HAS_SCALE=scale is not None, EVEN_K=_even_k(H),
        E_PAD=_e_pad(E), **_meta())
    dw = dwp.sum(1) if dwp is not None else None
    return dgu, hw, dw


def wgrad(a, atok, b, btok, counts, out):
    """out[e] = a[rows_e]^T @ b[rows_e] with rows optionally gathered through atok/btok."""
    E, P, Q = out.shape
    M = counts.numel() and (atok.shape[0] if atok is not None else a.shape[0])
    grid = lambda meta: (E * triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(Q, meta["BLOCK_N"]),)
    _k_wgrad[grid](
        a, atok if atok is not None else counts, b, btok if btok is not None else counts, out, counts,
        E, P, Q, _rows_hint(M, E),
        a.stride(0), b.stride(0), out.stride(0), out.stride(1), out.stride(2),
        A_GATHER=atok is not None, B_GATHER=btok is not None, E_PAD=_e_pad(E), **_meta())
    return out


def _even_k(K: int) -> bool:
    return K % (16 if INTERPRET else 64) == 0
