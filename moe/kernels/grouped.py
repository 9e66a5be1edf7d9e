"""Triton kernels for the routed-expert SwiGLU MLP over rows grouped by expert (dropless, no padding).

Rows are the (token, slot) pairs sorted by expert; expert e owns rows [start_e, start_e + n_e) where
n_e = counts[e]. No kernel needs host-side tile tables: each program builds the per-expert tile table
(cumulative sums over at most E_PAD entries) from the counts on the device, so nothing syncs with the
host and any number of local experts (EP shares), empty ones included, works.

Row-tiled kernels (`_gate_up_fwd`, `_rows_gemm`, `_down_bwd`) walk a tile space in which each
expert's rows are rounded up to a multiple of BLOCK_M, so every tile belongs to one expert; rows of a
tile past its expert's end are computed from whatever lies there and never stored. Tiles are ordered
GROUP_M row tiles at a time per column block (the row tiles of one expert run together and share its
weight tiles in L2). With PERSIST = p the grid is p programs per SM looping over the tiles, with
FLATTEN the tile loop is fused with the K loop (the next tile's loads are issued during this tile's
epilogue); PERSIST = 0 is one tile per program. Both are autotuned choices.

Kernels (each a plain `@triton.jit` function; the launchers pick the configuration):
- `_gate_up_fwd`: h = silu(x[tok] @ Wg) * (x[tok] @ Wu); the token gather is fused into the A loads,
  the SwiGLU into the epilogue; optionally saves the pre-activations for the backward.
- `_rows_gemm`: out[pos[r]] = scale[r] * (A[r] @ B_e); forward down projection (routing weight
  applied, rows scattered to their (token, slot) place) and backward dx (dgu @ Wgu_e^T).
- `_down_bwd`: dh = dy[tok] @ Wd_e^T with the SwiGLU backward and the routing-weight gradient
  (partial dot(dh, h) per column block) in the epilogue; also writes w*h (h for unweighted rows) for
  the Wd gradient. The epilogue can run in EPI_SPLIT column parts, so 256-wide tiles fit in registers.
- `_wgrad`: out_e = A[rows_e]^T @ B[rows_e] (weight gradients; reduction over the expert's rows,
  either operand optionally gathered by token). Full BLOCK_K row chunks run unmasked; the expert's
  last partial chunk is one masked step after the loop. The output tile is stored through a 3-D TMA
  descriptor ([E, P, Q], asynchronous, bounds per expert) when TMA_OUT is set; with ACCUMULATE the
  tile is added into an fp32 accumulator instead (gradient-accumulation fusion, `moe.wgrad`): read,
  add, write back; relaxed atomic adds; or a TMA bulk reduce-add (`ACC_MODE`, autotuned). No split over rows:
  with the dots1 shapes every expert has P/BLOCK_M x Q/BLOCK_N = 176-704 output tiles, enough to fill
  the SMs without one.
- `_slot_sum`: out[t] = sum over a token's K slots of the rows `_rows_gemm` scattered to (token, slot)
  places (the routed output and dx), added in fp32.

Loads: operands that are plain row-major matrices (the weights, seen as 2-D [E*K, N] or [E*N, K], and
activations that are not gathered by token) are read through TMA tensor descriptors created on the
device (`tl.make_tensor_descriptor`; the launchers install a Triton allocator for them) when
`TMA_A`/`TMA_B` are set, and through pointer loads otherwise (token-gathered operands, fp32 on CUDA,
misaligned strides, or MOE_TRITON_TMA=0). Both paths are the same kernels; the tests run both under
Triton's interpreter. A weight tile that runs past its expert's K rows reads the next expert's rows,
multiplied by the zeros the A operand has there (TMA zero-fills out of bounds, pointer loads mask).

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, or automatically when no
CUDA device exists) with one small fixed configuration; on CUDA they are autotuned over Hopper
configurations, keyed on the shapes, a log2 bucket of the rows per expert, the variant flags and the
dtypes; choices are kept per process and on disk (Triton's `cache_results`), so a training run tunes
each shape once.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

# Whether Triton interprets the kernels below (CPU tensors are only usable then): Triton's own
# setting, which its `jit` decorator reads as each kernel below is defined (TRITON_INTERPRET=1,
# set before the kernels are imported).
INTERPRET = bool(triton.knobs.runtime.interpret)
# TMA descriptor loads where the operand allows them: None follows MOE_TRITON_TMA (on unless "0"),
# read at each launch (`tma_enabled`); tests set True / False to cover both load paths.
USE_TMA: bool | None = None
_HAS_DESCRIPTOR_REDUCE = hasattr(tl.tensor_descriptor, "atomic_add")
_jit = triton.jit
# The interpreter (Triton 3.6-3.9) gets bf16 x bf16 dots wrong: upcast the operands there.
_DOT_F32 = tl.constexpr(INTERPRET)
# How the weight-gradient kernel adds into an fp32 accumulator (`ACC_MODE`, an autotuned choice; see
# `_wgrad`): read-add-write, relaxed atomic adds, or a TMA bulk reduce-add (compiled only: Triton's
# interpreter has no descriptor reduce).
ACC_READ, ACC_ATOMIC, ACC_TMA = 0, 1, 2
_ACC_READ, _ACC_TMA = tl.constexpr(ACC_READ), tl.constexpr(ACC_TMA)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

@_jit
def _expert_tables(counts_ptr, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per-expert vectors [E_PAD]: index, rows, row tiles, cumulative row tiles, row end."""
    e_ar = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + e_ar, mask=e_ar < E, other=0).to(tl.int32)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    return e_ar, cnt, tiles, tl.cumsum(tiles, 0), tl.cumsum(cnt, 0)


@_jit
def _row_tile(tile, e_ar, cnt, tiles, tile_end, row_end_all, num_pid_m, num_pid_n,
              BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index -> (expert, column block, first row, end of the expert's rows).

    The row-tile space has sum_e cdiv(n_e, BLOCK_M) = num_pid_m entries, expert after expert;
    GROUP_M row tiles at a time sweep the column blocks (L2 reuse of A rows and weight tiles)."""
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group) % size_m
    pid_n = (tile % group) // size_m
    e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    sel = e_ar == e
    n_e = tl.sum(tl.where(sel, cnt, 0), 0)
    end = tl.sum(tl.where(sel, row_end_all, 0), 0)
    t0 = tl.sum(tl.where(sel, tile_end - tiles, 0), 0)
    row0 = end - n_e + (pid_m - t0) * BLOCK_M
    return e, pid_n, row0, end


@_jit
def _gate_up_fwd(x_ptr, tok_ptr, w_ptr, gu_ptr, h_ptr, counts_ptr,
                 M, MX, E, N, K, ROWS_HINT,
                 stride_xm, stride_we, stride_wk, stride_wn, stride_gum, stride_hm,
                 HAS_GATHER: tl.constexpr, SAVE_GU: tl.constexpr, TMA_A: tl.constexpr, TMA_B: tl.constexpr,
                 EVEN_K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PERSIST: tl.constexpr, FLATTEN: tl.constexpr):
    # N = I (per half); w is [E, K=H, 2N]: gate columns [0, N), up columns [N, 2N). x has MX rows.
    e_ar, cnt, tiles, tile_end, row_end_all = _expert_tables(counts_ptr, E, E_PAD, BLOCK_M)
    num_pid_m = tl.sum(tiles, 0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    if TMA_A:
        a_desc = tl.make_tensor_descriptor(x_ptr, shape=[MX, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    if TMA_B:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * K, 2 * N], strides=[stride_wk, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    rk = tl.arange(0, BLOCK_K)
    out_dtype = h_ptr.dtype.element_ty
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        e, pid_n, row0, row_end = _row_tile(tile, e_ar, cnt, tiles, tile_end, row_end_all,
                                            num_pid_m, num_pid_n, BLOCK_M, GROUP_M)
        rm = row0 + tl.arange(0, BLOCK_M)
        mrow = rm < row_end
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if not TMA_A:
            rm_c = tl.where(mrow, rm, row0)
            if HAS_GATHER:
                src = tl.load(tok_ptr + rm_c).to(tl.int64)
            else:
                src = rm_c.to(tl.int64)
            a_ptrs = x_ptr + src[:, None] * stride_xm + rk[None, :]
        if not TMA_B:
            bg_ptrs = w_ptr + e.to(tl.int64) * stride_we + rk[:, None] * stride_wk + (rn % N)[None, :] * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_tiles):
            k0 = k * BLOCK_K
            if TMA_A:
                a = a_desc.load([row0, k0])
            elif EVEN_K:
                a = tl.load(a_ptrs + k0)
            else:
                a = tl.load(a_ptrs + k0, mask=(k0 + rk)[None, :] < K, other=0.0)
            if TMA_B:
                bg = w_desc.load([e * K + k0, pid_n * BLOCK_N])
                bu = w_desc.load([e * K + k0, N + pid_n * BLOCK_N])
            elif EVEN_K:
                bg = tl.load(bg_ptrs + k0 * stride_wk)
                bu = tl.load(bg_ptrs + k0 * stride_wk + N * stride_wn)
            else:
                mk = (k0 + rk)[:, None] < K
                bg = tl.load(bg_ptrs + k0 * stride_wk, mask=mk, other=0.0)
                bu = tl.load(bg_ptrs + k0 * stride_wk + N * stride_wn, mask=mk, other=0.0)
            if _DOT_F32:
                a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)

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
               HAS_SCALE: tl.constexpr, HAS_SCATTER: tl.constexpr, TMA_A: tl.constexpr, TMA_B: tl.constexpr,
               B_TRANS: tl.constexpr, EVEN_K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PERSIST: tl.constexpr,
               FLATTEN: tl.constexpr):
    # out[pos[r], :] = scale[r] * (A[r, :] @ B[e]) for the rows r of expert e (A rows sorted).
    # B[e] is [K, N] row-major (B_TRANS=False) or the transpose of an [N, K] row-major block.
    e_ar, cnt, tiles, tile_end, row_end_all = _expert_tables(counts_ptr, E, E_PAD, BLOCK_M)
    num_pid_m = tl.sum(tiles, 0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    if TMA_A:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    if TMA_B:
        if B_TRANS:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * N, K], strides=[stride_bn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * K, N], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
    rk = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        e, pid_n, row0, row_end = _row_tile(tile, e_ar, cnt, tiles, tile_end, row_end_all,
                                            num_pid_m, num_pid_n, BLOCK_M, GROUP_M)
        rm = row0 + tl.arange(0, BLOCK_M)
        mrow = rm < row_end
        rm_c = tl.where(mrow, rm, row0).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if not TMA_A:
            a_ptrs = a_ptr + rm_c[:, None] * stride_am + rk[None, :]
        if not TMA_B:
            b_ptrs = b_ptr + e.to(tl.int64) * stride_be + rk[:, None] * stride_bk + (rn % N)[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_tiles):
            k0 = k * BLOCK_K
            if TMA_A:
                a = a_desc.load([row0, k0])
            elif EVEN_K:
                a = tl.load(a_ptrs + k0)
            else:
                a = tl.load(a_ptrs + k0, mask=(k0 + rk)[None, :] < K, other=0.0)
            if TMA_B:
                if B_TRANS:
                    b = b_desc.load([e * N + pid_n * BLOCK_N, k0]).T
                else:
                    b = b_desc.load([e * K + k0, pid_n * BLOCK_N])
            elif EVEN_K:
                b = tl.load(b_ptrs + k0 * stride_bk)
            else:
                b = tl.load(b_ptrs + k0 * stride_bk, mask=(k0 + rk)[:, None] < K, other=0.0)
            if _DOT_F32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)

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
def _swiglu_bwd_part(acc, part_id, rm64, rm_c, mrow, N, N_DWP, gu_ptr, scale_ptr, dgu_ptr, hw_ptr, dwp_ptr,
                     stride_gum, stride_dgum, stride_hwm, stride_dwpm,
                     HAS_SCALE: tl.constexpr, PART: tl.constexpr):
    """The dh epilogue on columns [part_id*PART, (part_id+1)*PART) of I: SwiGLU backward -> dg, du; w*h (h
    if unweighted) for the Wd gradient; the routing-weight gradient partial sum(dh * h) over these columns."""
    rn = part_id * PART + tl.arange(0, PART)
    mask = mrow[:, None] & (rn[None, :] < N)
    g_ptrs = gu_ptr + rm64[:, None] * stride_gum + rn[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    h = silu * u
    if HAS_SCALE:
        s = tl.load(scale_ptr + rm_c).to(tl.float32)
        psum = tl.sum(tl.where(mask, acc * h, 0.0), 1)
        # dwp has one column per 16 columns of I; this part owns PART // 16 of them: its partial goes in
        # the first, zeros in the rest, so every column is written whatever the config (the autotuner
        # runs several configs on the same buffer)
        SUB: tl.constexpr = PART // 16
        sub = tl.arange(0, SUB)
        cols = part_id * SUB + sub
        vals = tl.where(sub[None, :] == 0, psum[:, None], 0.0)
        tl.store(dwp_ptr + rm64[:, None] * stride_dwpm + cols[None, :], vals,
                 mask=mrow[:, None] & (cols[None, :] < N_DWP))
        dh = acc * s[:, None]
        h = h * s[:, None]
    else:
        dh = acc
    tl.store(hw_ptr + rm64[:, None] * stride_hwm + rn[None, :], h.to(hw_ptr.dtype.element_ty), mask=mask)
    du = dh * silu
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    d_ptrs = dgu_ptr + rm64[:, None] * stride_dgum + rn[None, :]
    out_dtype = dgu_ptr.dtype.element_ty
    tl.store(d_ptrs, dg.to(out_dtype), mask=mask)
    tl.store(d_ptrs + N, du.to(out_dtype), mask=mask)


@_jit
def _halves(acc, BM: tl.constexpr, BN: tl.constexpr):
    """[BM, BN] -> its column halves [BM, BN/2] x 2."""
    return tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))


@_jit
def _down_bwd(dy_ptr, tok_ptr, wd_ptr, gu_ptr, scale_ptr, dgu_ptr, hw_ptr, dwp_ptr, counts_ptr,
              M, MY, E, N, K, ROWS_HINT, N_DWP,
              stride_dym, stride_we, stride_wn, stride_wk, stride_gum, stride_dgum, stride_hwm, stride_dwpm,
              HAS_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, TMA_A: tl.constexpr, TMA_B: tl.constexpr,
              EVEN_K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PERSIST: tl.constexpr, FLATTEN: tl.constexpr,
              EPI_SPLIT: tl.constexpr):
    # dh_unw[r, i] = sum_k dy[tok[r], k] * Wd[e][i, k]  (N = I, K = H; Wd [E, I, H]; dy has MY rows)
    e_ar, cnt, tiles, tile_end, row_end_all = _expert_tables(counts_ptr, E, E_PAD, BLOCK_M)
    num_pid_m = tl.sum(tiles, 0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    if TMA_A:
        a_desc = tl.make_tensor_descriptor(dy_ptr, shape=[MY, K], strides=[stride_dym, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    if TMA_B:
        w_desc = tl.make_tensor_descriptor(wd_ptr, shape=[E * N, K], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    rk = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        e, pid_n, row0, row_end = _row_tile(tile, e_ar, cnt, tiles, tile_end, row_end_all,
                                            num_pid_m, num_pid_n, BLOCK_M, GROUP_M)
        rm = row0 + tl.arange(0, BLOCK_M)
        mrow = rm < row_end
        rm_c = tl.where(mrow, rm, row0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm64 = rm.to(tl.int64)
        if not TMA_A:
            if HAS_GATHER:
                src = tl.load(tok_ptr + rm_c).to(tl.int64)
            else:
                src = rm_c.to(tl.int64)
            a_ptrs = dy_ptr + src[:, None] * stride_dym + rk[None, :]
        if not TMA_B:
            b_ptrs = wd_ptr + e.to(tl.int64) * stride_we + rk[:, None] * stride_wk + (rn % N)[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_tiles):
            k0 = k * BLOCK_K
            if TMA_A:
                a = a_desc.load([row0, k0])
            elif EVEN_K:
                a = tl.load(a_ptrs + k0)
            else:
                a = tl.load(a_ptrs + k0, mask=(k0 + rk)[None, :] < K, other=0.0)
            if TMA_B:
                b = w_desc.load([e * N + pid_n * BLOCK_N, k0]).T
            elif EVEN_K:
                b = tl.load(b_ptrs + k0 * stride_wk)
            else:
                b = tl.load(b_ptrs + k0 * stride_wk, mask=(k0 + rk)[:, None] < K, other=0.0)
            if _DOT_F32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)

        # the epilogue in EPI_SPLIT column parts (fewer live registers with wide tiles)
        P1: tl.constexpr = BLOCK_N // EPI_SPLIT
        if EPI_SPLIT == 1:
            _swiglu_bwd_part(acc, pid_n, rm64, rm_c, mrow, N, N_DWP, gu_ptr, scale_ptr, dgu_ptr, hw_ptr, dwp_ptr,
                             stride_gum, stride_dgum, stride_hwm, stride_dwpm, HAS_SCALE, P1)
        elif EPI_SPLIT == 2:
            a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
            _swiglu_bwd_part(a0, 2 * pid_n, rm64, rm_c, mrow, N, N_DWP, gu_ptr, scale_ptr, dgu_ptr, hw_ptr, dwp_ptr,
                             stride_gum, stride_dgum, stride_hwm, stride_dwpm, HAS_SCALE, P1)
            _swiglu_bwd_part(a1, 2 * pid_n + 1, rm64, rm_c, mrow, N, N_DWP, gu_ptr, scale_ptr, dgu_ptr, hw_ptr,
                             dwp_ptr, stride_gum, stride_dgum, stride_hwm, stride_dwpm, HAS_SCALE, P1)
        else:
            tl.static_assert(EPI_SPLIT == 4)
            a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
            a00, a01 = _halves(a0, BLOCK_M, BLOCK_N // 2)
            a10, a11 = _halves(a1, BLOCK_M, BLOCK_N // 2)
            _swiglu_bwd_part(a00, 4 * pid_n, rm64, rm_c, mrow, N, N_DWP, gu_ptr, scale_ptr, dgu_ptr, hw_ptr, dwp_ptr,
                             stride_gum, stride_dgum, stride_hwm, stride_dwpm, HAS_SCALE, P1)
            _swiglu_bwd_part(a01, 4 * pid_n + 1, rm64, rm_c, mrow, N, N_DWP, gu_ptr, scale_ptr, dgu_ptr, hw_ptr,
                             dwp_ptr, stride_gum, stride_dgum, stride_hwm, stride_dwpm, HAS_SCALE, P1)
            _swiglu_bwd_part(a10, 4 * pid_n + 2, rm64, rm_c, mrow, N, N_DWP, gu_ptr, scale_ptr, dgu_ptr, hw_ptr,
                             dwp_ptr, stride_gum, stride_dgum, stride_hwm, stride_dwpm, HAS_SCALE, P1)
            _swiglu_bwd_part(a11, 4 * pid_n + 3, rm64, rm_c, mrow, N, N_DWP, gu_ptr, scale_ptr, dgu_ptr, hw_ptr,
                             dwp_ptr, stride_gum, stride_dgum, stride_hwm, stride_dwpm, HAS_SCALE, P1)


@_jit
def _wgrad(a_ptr, atok_ptr, b_ptr, btok_ptr, out_ptr, counts_ptr,
           MA, MB, E, P, Q, ROWS_HINT,
           stride_am, stride_bm, stride_oe, stride_op, stride_oq,
           A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, TMA_A: tl.constexpr, TMA_B: tl.constexpr,
           TMA_OUT: tl.constexpr, ACCUMULATE: tl.constexpr, ACC_MODE: tl.constexpr, E_PAD: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
           PERSIST: tl.constexpr, FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr):
    # out[e][p, q] = sum_{r in rows of e} A[ra(r), p] * B[rb(r), q]   (A has MA rows, B has MB rows);
    # ACCUMULATE: out[e][p, q] += that sum into the fp32 accumulator, by ACC_MODE: ACC_READ reads the
    # old tile, adds in fp32 and writes it back; ACC_ATOMIC adds by relaxed atomics that the L2 applies
    # (no old tile in registers); ACC_TMA hands the tile to a TMA bulk reduce-add (asynchronous, from
    # shared memory; needs TMA_OUT). Every element gets exactly one add per launch, so all three give
    # the read-add-write's sum, bit for bit. TMA_OUT: out is a contiguous [E, P, Q] written through a
    # 3-D descriptor (asynchronous store or reduce, bounds per expert). EPI_SPLIT: the epilogue in that
    # many column parts (1 or 2: fewer live registers, a smaller shared-memory tile for the TMA).
    e_ar = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + e_ar, mask=e_ar < E, other=0).to(tl.int32)
    row_end_all = tl.cumsum(cnt, 0)
    num_pid_p = tl.cdiv(P, BLOCK_M)
    num_pid_q = tl.cdiv(Q, BLOCK_N)
    per_e = num_pid_p * num_pid_q
    group = GROUP_M * num_pid_q
    if TMA_A:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[MA, P], strides=[stride_am, 1],
                                           block_shape=[BLOCK_K, BLOCK_M])
    if TMA_B:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[MB, Q], strides=[stride_bm, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    if TMA_OUT:
        o_desc = tl.make_tensor_descriptor(out_ptr, shape=[E, P, Q], strides=[stride_oe, stride_op, 1],
                                           block_shape=[1, BLOCK_M, BLOCK_N // EPI_SPLIT])
    else:
        o_desc = out_ptr  # unused
    rk = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), E * per_e, tl.num_programs(0), flatten=FLATTEN):
        e = tile // per_e
        t = tile % per_e
        first_p = (t // group) * GROUP_M
        size_p = min(num_pid_p - first_p, GROUP_M)
        pid_p = first_p + (t % group) % size_p
        pid_q = (t % group) // size_p
        sel = e_ar == e
        end = tl.sum(tl.where(sel, row_end_all, 0), 0)
        start = end - tl.sum(tl.where(sel, cnt, 0), 0)
        n_full = (end - start) // BLOCK_K

        rp = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
        rq = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
        rp_c = rp % P
        rq_c = rq % Q
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, n_full):  # full chunks: no masks
            r0 = start + i * BLOCK_K
            rr = r0 + rk
            if TMA_A:
                a = a_desc.load([r0, pid_p * BLOCK_M]).T
            else:
                if A_GATHER:
                    ra = tl.load(atok_ptr + rr).to(tl.int64)
                else:
                    ra = rr.to(tl.int64)
                a = tl.load(a_ptr + ra[None, :] * stride_am + rp_c[:, None])
            if TMA_B:
                b = b_desc.load([r0, pid_q * BLOCK_N])
            else:
                if B_GATHER:
                    rb = tl.load(btok_ptr + rr).to(tl.int64)
                else:
                    rb = rr.to(tl.int64)
                b = tl.load(b_ptr + rb[:, None] * stride_bm + rq_c[None, :])
            if _DOT_F32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        r0 = start + n_full * BLOCK_K
        if r0 < end:  # the last partial chunk, masked
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

        p0 = pid_p * BLOCK_M
        q0 = pid_q * BLOCK_N
        if EPI_SPLIT == 1:
            _wgrad_out(acc, o_desc, out_ptr, e, p0, q0, rp, P, Q, stride_oe, stride_op,
                       stride_oq, TMA_OUT, ACCUMULATE, ACC_MODE, BLOCK_M, BLOCK_N)
        else:
            tl.static_assert(EPI_SPLIT == 2)
            half: tl.constexpr = BLOCK_N // 2
            a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
            _wgrad_out(a0, o_desc, out_ptr, e, p0, q0, rp, P, Q, stride_oe, stride_op,
                       stride_oq, TMA_OUT, ACCUMULATE, ACC_MODE, BLOCK_M, half)
            _wgrad_out(a1, o_desc, out_ptr, e, p0, q0 + half, rp, P, Q, stride_oe,
                       stride_op, stride_oq, TMA_OUT, ACCUMULATE, ACC_MODE, BLOCK_M, half)


@_jit
def _wgrad_out(part, o_desc, out_ptr, e, p0, q0, rp, P, Q, stride_oe, stride_op, stride_oq,
               TMA_OUT: tl.constexpr, ACCUMULATE: tl.constexpr, ACC_MODE: tl.constexpr,
               BLOCK_M: tl.constexpr, BN: tl.constexpr):
    """One column part [BLOCK_M, BN] of a weight-gradient tile (at p0, q0 of expert e) out, as `_wgrad`'s
    ACCUMULATE / ACC_MODE / TMA_OUT say."""
    if TMA_OUT and ACCUMULATE and ACC_MODE == _ACC_TMA:
        o_desc.atomic_add([e, p0, q0], part.reshape(1, BLOCK_M, BN))
    elif TMA_OUT and not ACCUMULATE:
        o_desc.store([e, p0, q0], part.to(out_ptr.dtype.element_ty).reshape(1, BLOCK_M, BN))
    else:
        rq = q0 + tl.arange(0, BN)
        mask = (rp[:, None] < P) & (rq[None, :] < Q)
        o_ptrs = out_ptr + e.to(tl.int64) * stride_oe + rp[:, None] * stride_op + rq[None, :] * stride_oq
        if ACCUMULATE and ACC_MODE != _ACC_READ:
            tl.atomic_add(o_ptrs, part, mask=mask, sem="relaxed")
        else:
            if ACCUMULATE:
                part += tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_ptrs, part.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _slot_sum(src_ptr, out_ptr, T, H, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    # out[t] = sum_k src[t * K + k] (the K slots of a token, stored next to each other), added in fp32
    # slot after slot and rounded once
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rt[:, None] < T) & (rh[None, :] < H)
    src = src_ptr + rt[:, None].to(tl.int64) * (K * H) + rh[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(K):
        acc += tl.load(src + k * H, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rt[:, None].to(tl.int64) * H + rh[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------

def _cfg(bm, bn, bk, warps, stages, persist=1, flatten=None, group=8, **extra):
    """PERSIST: programs per SM looping over the tiles (0: one tile per program); FLATTEN: fuse the tile
    loop with the K loop (the next tile's loads overlap this tile's epilogue; default: when persistent)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "PERSIST": persist,
                          "FLATTEN": bool(persist) if flatten is None else flatten, **extra},
                         num_warps=warps, num_stages=stages)


# Hopper (H100/H200) candidates, from a sweep on the dots1 bench shapes (bench/RESULTS.md); BLOCK_N of
# the gate/up kernel is per half (two accumulators).
_GATE_UP_CONFIGS = [
    _cfg(128, 128, 64, 8, 4, flatten=False), _cfg(128, 128, 64, 8, 3, flatten=False),
    _cfg(128, 128, 64, 8, 4, persist=0),
]
_ROWS_CONFIGS = [
    _cfg(128, 256, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4),
]
_DOWN_BWD_CONFIGS = [  # EPI_SPLIT: the SwiGLU-backward epilogue in that many column parts
    _cfg(128, 128, 64, 8, 4, EPI_SPLIT=1), _cfg(128, 128, 64, 8, 4, flatten=False, EPI_SPLIT=1),
    _cfg(128, 256, 64, 8, 3, flatten=False, EPI_SPLIT=4), _cfg(128, 128, 64, 4, 3, persist=2, EPI_SPLIT=2),
    _cfg(128, 128, 64, 4, 3, persist=0, EPI_SPLIT=2),
]
_WGRAD_CONFIGS = [  # ACC_MODE: only read when accumulating (below)
    _cfg(128, 256, 64, 8, 3, flatten=False, ACC_MODE=ACC_READ, EPI_SPLIT=1),
    _cfg(128, 256, 64, 8, 3, ACC_MODE=ACC_READ, EPI_SPLIT=1),
    _cfg(128, 256, 32, 8, 5, flatten=False, ACC_MODE=ACC_READ, EPI_SPLIT=1),
    _cfg(128, 128, 64, 4, 2, persist=2, flatten=False, ACC_MODE=ACC_READ, EPI_SPLIT=1),
]
# Accumulating into fp32: each candidate with each way of adding, in triples (read-add-write, atomic,
# TMA reduce; so the GPU tests' first three candidates are one of each). The TMA reduce goes out in
# 128-column parts (a 64 KiB fp32 tile in shared memory next to the pipeline's). On the slice's dWgu
# (H100, bench_experts --breakdown): 497 / 559 / 565 TFLOP/s.
_WGRAD_INTO_CONFIGS = [
    triton.Config({**c.kwargs, "ACC_MODE": mode,
                   "EPI_SPLIT": max(1, c.kwargs["BLOCK_N"] // 128) if mode == ACC_TMA else 1},
                  num_warps=c.num_warps, num_stages=c.num_stages)
    for c in _WGRAD_CONFIGS for mode in (ACC_READ, ACC_ATOMIC, ACC_TMA)]
_SLOT_SUM_CONFIGS = [triton.Config({"BLOCK_T": bt, "BLOCK_H": bh}, num_warps=w)
                     for bt, bh, w in ((4, 1024, 4), (8, 512, 4), (16, 512, 8), (2, 2048, 8))]
# the interpreter: one small configuration (tl.dot needs every dimension >= 16); persistent with a
# few programs, so a program walks several tiles
_INTERP = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "PERSIST": 1, "FLATTEN": True}
_INTERP_PROGRAMS = 3
_INTERP_DOWN_BWD = {"EPI_SPLIT": 1}
_INTERP_WGRAD = {"ACC_MODE": ACC_READ, "EPI_SPLIT": 1}

_SMEM_LIMIT = 220 * 1024


def _pruner(first_arg: str, n_b: int):
    """Drop configs whose pipelined A/B tiles (and fp32 TMA reduce tile) exceed shared memory (fp32
    inputs), and TMA reduces where the accumulator has no descriptor; keep one that fits."""
    def prune(configs, named_args, **kwargs):
        esize = named_args[first_arg].element_size()
        def smem(c):
            k = c.kwargs
            out = k["BLOCK_M"] * k["BLOCK_N"] // k["EPI_SPLIT"] * 4 if k.get("ACC_MODE") == ACC_TMA else 0
            return (k["BLOCK_M"] * k["BLOCK_K"] + n_b * k["BLOCK_K"] * k["BLOCK_N"]) * esize * c.num_stages + out
        def usable(c):
            return c.kwargs.get("ACC_MODE") != ACC_TMA or kwargs.get("TMA_OUT", False)
        kept = [c for c in configs if usable(c) and smem(c) <= _SMEM_LIMIT]
        small = {**configs[0].kwargs, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "PERSIST": 0, "FLATTEN": False}
        return kept or [triton.Config(small, num_warps=4, num_stages=2)]
    return prune


_even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
_ROW_KEYS = ["N", "K", "ROWS_HINT", "TMA_A", "TMA_B"]
if INTERPRET:
    _k_gate_up, _k_rows, _k_down_bwd = _even_k(_gate_up_fwd), _even_k(_rows_gemm), _even_k(_down_bwd)
    _k_wgrad = _k_wgrad_into = _wgrad
    _k_slot_sum = _slot_sum
else:
    _CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}

    def _tuned(configs, keys, first_arg, n_b, **extra):
        return triton.autotune(configs, key=keys, prune_configs_by={"early_config_prune": _pruner(first_arg, n_b)},
                               **_CACHE, **extra)
    _k_gate_up = _tuned(_GATE_UP_CONFIGS, _ROW_KEYS + ["HAS_GATHER", "SAVE_GU"], "x_ptr", 2)(_even_k(_gate_up_fwd))
    _k_rows = _tuned(_ROWS_CONFIGS, _ROW_KEYS + ["B_TRANS", "HAS_SCALE", "HAS_SCATTER"], "a_ptr", 1)(
        _even_k(_rows_gemm))
    _k_down_bwd = _tuned(_DOWN_BWD_CONFIGS, _ROW_KEYS + ["HAS_GATHER", "HAS_SCALE"], "dy_ptr", 1)(
        _even_k(_down_bwd))
    _WGRAD_KEYS = ["P", "Q", "ROWS_HINT", "TMA_A", "TMA_B", "TMA_OUT", "A_GATHER", "B_GATHER"]
    _k_wgrad = _tuned(_WGRAD_CONFIGS, _WGRAD_KEYS, "a_ptr", 1)(_wgrad)
    # accumulating: the autotuner runs each candidate on the real accumulator, so it restores it after each
    _k_wgrad_into = _tuned(_WGRAD_INTO_CONFIGS, _WGRAD_KEYS, "a_ptr", 1, restore_value=["out_ptr"])(_wgrad)
    _k_slot_sum = triton.autotune(_SLOT_SUM_CONFIGS, key=["H", "K"], **_CACHE)(_slot_sum)


def _meta(**interp_extra):
    return {**_INTERP, **interp_extra} if INTERPRET else {}


def _e_pad(E: int) -> int:
    return max(16, triton.next_power_of_2(E))


def _rows_hint(M: int, E: int) -> int:
    """Autotune key: log2 bucket of the mean rows per expert."""
    return max(0, (max(M, 1) // max(E, 1)).bit_length())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs(tiles: int, meta) -> int:
    if not meta["PERSIST"]:
        return max(1, tiles)
    sms = _INTERP_PROGRAMS if INTERPRET else _num_sms(torch.cuda.current_device())
    return max(1, min(tiles, sms * meta["PERSIST"]))


def _grid_rows(M, E, N):
    """Upper bound of the row tiles (sum_e cdiv(n_e, BLOCK_M) <= cdiv(M, BLOCK_M) + min(E, M)) x column blocks."""
    return lambda meta: (_programs((triton.cdiv(M, meta["BLOCK_M"]) + min(E, M)) * triton.cdiv(N, meta["BLOCK_N"]),
                                   meta),)


def _tma_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def tma_enabled() -> bool:
    """`USE_TMA`, or MOE_TRITON_TMA when it is None."""
    return USE_TMA if USE_TMA is not None else os.environ.get("MOE_TRITON_TMA", "1") not in ("", "0")


def _tma_ok(t, whole: bool = False) -> bool:
    """Can `t` (2-D rows, or a contiguous stack seen as 2-D when `whole`) be read through a TMA descriptor?
    Compiled: 16-bit dtypes only (fp32 keeps the pointer loads); strides and base 16-byte aligned."""
    if not tma_enabled() or (not INTERPRET and t.element_size() != 2) or t.dim() < 2:
        return False
    if whole and not t.is_contiguous():
        return False
    return t.stride(-1) == 1 and (t.stride(-2) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _tma_reduce_ok(acc) -> bool:
    """Can the fp32 accumulator `acc` [E, P, Q] take TMA bulk reduce-adds (ACC_TMA)? Compiled only (the
    interpreter has no descriptor reduce), contiguous, 16-byte aligned, a Triton that has them, and
    not turned off (MOE_TRITON_TMA_REDUCE=0, like MOE_TRITON_TMA for the loads)."""
    return (tma_enabled() and os.environ.get("MOE_TRITON_TMA_REDUCE", "1") not in ("", "0") and not INTERPRET
            and _HAS_DESCRIPTOR_REDUCE and acc.dtype == torch.float32
            and acc.is_contiguous() and (acc.stride(1) * 4) % 16 == 0 and acc.data_ptr() % 16 == 0)


def _install_tma_allocator_if(*flags) -> tuple:
    """Returns `flags`; when any is set, first installs the allocator that device-side TMA
    descriptors take their scratch memory from (`triton.set_allocator`: a context variable, so it is
    set in the launching thread, autograd's included)."""
    if any(flags):
        triton.set_allocator(_tma_alloc)
    return flags


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
    tma_a, tma_b = _install_tma_allocator_if(tok is None and _tma_ok(x), _tma_ok(w_gate_up, whole=True))
    _k_gate_up[_grid_rows(M, E, N)](
        x, tok if tok is not None else counts, w_gate_up, gu, h, counts,
        M, x.shape[0], E, N, H, _rows_hint(M, E),
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), gu.stride(0), h.stride(0),
        HAS_GATHER=tok is not None, SAVE_GU=save_gu, TMA_A=tma_a, TMA_B=tma_b,
        E_PAD=_e_pad(E), **_meta())
    return h, (gu if save_gu else None)


def rows_gemm(a, b, b_strides, N, K, counts, out, scale=None, pos=None):
    """out[pos[r]] = scale[r] * a[r] @ B_e, B_e given by (stride_e, stride_k, stride_n) over b."""
    M = a.shape[0]
    E = counts.shape[0]
    if M == 0:
        return out
    b_trans = b_strides[1] == 1 and N > 1
    row_stride = b_strides[2] if b_trans else b_strides[1]
    tma_a, tma_b = _install_tma_allocator_if(_tma_ok(a), _tma_ok(b, whole=True) and b_strides[0] == N * K
                        and row_stride == (K if b_trans else N))
    _k_rows[_grid_rows(M, E, N)](
        a, b, out, counts, scale if scale is not None else a, pos if pos is not None else counts,
        M, E, N, K, _rows_hint(M, E),
        a.stride(0), b_strides[0], b_strides[1], b_strides[2], out.stride(0),
        HAS_SCALE=scale is not None, HAS_SCATTER=pos is not None, TMA_A=tma_a, TMA_B=tma_b, B_TRANS=b_trans,
        E_PAD=_e_pad(E), **_meta())
    return out


def down_bwd(dy, tok, w_down, gu, scale, counts, M):
    """-> (dgu [M, 2I], w*h [M, I] (h when scale is None), routing-weight grad [M] fp32 or None)."""
    E, I, H = w_down.shape
    dgu = torch.empty(M, 2 * I, device=dy.device, dtype=dy.dtype)
    hw = torch.empty(M, I, device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dgu, hw, (torch.zeros(0, device=dy.device, dtype=torch.float32) if scale is not None else None)
    n_dwp = triton.cdiv(I, 16)
    dwp = torch.empty(M, n_dwp, device=dy.device, dtype=torch.float32) if scale is not None else None
    tma_a, tma_b = _install_tma_allocator_if(tok is None and _tma_ok(dy), _tma_ok(w_down, whole=True))
    _k_down_bwd[_grid_rows(M, E, I)](
        dy, tok if tok is not None else counts, w_down, gu, scale if scale is not None else gu, dgu,
        hw, dwp if dwp is not None else dgu, counts,
        M, dy.shape[0], E, I, H, _rows_hint(M, E), n_dwp,
        dy.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), gu.stride(0), dgu.stride(0),
        hw.stride(0), dwp.stride(0) if dwp is not None else 0,
        HAS_GATHER=tok is not None, HAS_SCALE=scale is not None, TMA_A=tma_a, TMA_B=tma_b,
        E_PAD=_e_pad(E), **_meta(**_INTERP_DOWN_BWD))
    dw = dwp.sum(1) if dwp is not None else None
    return dgu, hw, dw


def wgrad(a, atok, b, btok, counts, out, accumulate: bool = False):
    """out[e] = a[rows_e]^T @ b[rows_e] with rows optionally gathered through atok/btok; with
    `accumulate`, out[e] += that product (out: the fp32 accumulator, added to in the epilogue)."""
    E, P, Q = out.shape
    M = counts.numel() and (atok.shape[0] if atok is not None else a.shape[0])
    tma_a, tma_b, tma_out = _install_tma_allocator_if(atok is None and _tma_ok(a), btok is None and _tma_ok(b),
                                 _tma_reduce_ok(out) if accumulate else _tma_ok(out, whole=True))
    grid = lambda meta: (_programs(E * triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(Q, meta["BLOCK_N"]), meta),)
    (_k_wgrad_into if accumulate else _k_wgrad)[grid](
        a, atok if atok is not None else counts, b, btok if btok is not None else counts, out, counts,
        a.shape[0], b.shape[0], E, P, Q, _rows_hint(M, E),
        a.stride(0), b.stride(0), out.stride(0), out.stride(1), out.stride(2),
        A_GATHER=atok is not None, B_GATHER=btok is not None, TMA_A=tma_a, TMA_B=tma_b, TMA_OUT=tma_out,
        ACCUMULATE=accumulate, E_PAD=_e_pad(E), **_meta(**_INTERP_WGRAD))
    return out


def slot_sum(buf, n_tokens: int, top_k: int):
    """buf [n_tokens * top_k, H] (a token's slots next to each other) -> [n_tokens, H], each token's
    slots summed in fp32 and rounded once, in one pass over buf (H100: ~2.9 TB/s, against ~2.0 for
    torch's strided `view(T, K, H).sum(1)`; bench_experts --breakdown)."""
    H = buf.shape[1]
    out = torch.empty(n_tokens, H, device=buf.device, dtype=buf.dtype)
    if n_tokens == 0:
        return out
    meta = {"BLOCK_T": 4, "BLOCK_H": 16} if INTERPRET else {}
    grid = lambda m: (triton.cdiv(n_tokens, m["BLOCK_T"]), triton.cdiv(H, m["BLOCK_H"]))
    _k_slot_sum[grid](buf, out, n_tokens, H, K=top_k, **meta)
    return out
