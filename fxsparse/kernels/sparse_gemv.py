"""Fused threshold-mask + sparse GEMV: the CUDA implementation of ``fxsparse::threshold_linear``.

A decode-time linear reads its whole weight for one or two rows, so its time is the weight's bytes.
This kernel reads only the weight rows of the input channels it keeps: ``W`` ([N, K]) must be
column-major (``W.t()`` contiguous; ``supports()`` declines other layouts), so a dropped channel
is a skipped contiguous run. Phase 1: each program thresholds its K-split of ``x`` in float32
(``keep = not(|x - center| * scale < threshold)``, NaN kept) and compacts the kept channels
(prefix sum + scatter) into a small scratch; phase 2 streams only those rows of ``Wᵀ`` through a
pipelined loop, so the work scales with the kept count. The center is folded out as a bias
(``b + W @ center``, computed once by the caller). K-split partials are summed with float32
atomics and finished by the last split to arrive (no memset), or, under
``torch.use_deterministic_algorithms``, in a fixed order; ``accumulate`` leaves the float32 sums to
the output's reader. One launch serves 1-3 weights that share ``x`` and the mask (q/k/v, gate/up),
and the input may be ``act(a) * b``, computed while loading. Block sizes come from a fixed rule on
shape and dtype (no autotuning: graph-capturable); docs/performance.md has the design and the
measurements behind each rule. Runs on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .center_bias import center_bias_value, fresh_center_bias
from .threshold_linear import ACTIVATIONS, QUANT_DTYPES, activation_reference

try:  # grid dependency control (Hopper's programmatic dependent launch)
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # an older Triton: configs never ask for it (_pdl_ok)
    gdc_wait = None

__all__ = ["MAX_MEMBERS", "QUANT_DTYPES", "GemvConfig", "masked_input", "max_rows", "reserve", "supports",
           "threshold_gemv", "threshold_gemv_group"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_ACT_CODE = {"silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}  # _prologue's ACT
assert set(_ACT_CODE) == set(ACTIVATIONS)
_COUNTER_CAPACITY = 16384  # N-blocks that can use split-K at once (N <= 2M at BLOCK_N = 128)
_MAX_SPLIT_K = 64
MAX_MEMBERS = 3  # weights one launch serves (q/k/v)
MAX_ROW_KERNEL_ROWS = 16  # rows the one-row kernel's stream takes when asked (config row_kernel=True)
_STREAM_MAX_ROWS = 2  # rows that take it by default (max_rows)
TWO_ROW_MIN_SPARSITY = 0.5  # planned sparsity from which two rows take it (max_rows)
MAX_FMA_ROWS = 4  # above it (or with row_dot) that stream multiplies on tensor cores
# Triton 3.9's interpreter mis-multiplies bf16 in tl.dot: it gets float32 operands instead.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """float32 ``v`` rounded to DTYPE (nearest-even), back in float32."""
    if DTYPE == tl.bfloat16:  # by hand: Triton 3.9's interpreter truncates bf16 casts
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        # NaN kept as is: the GPU's canonical NaN (0x7FFFFFFF) would carry into the sign bit
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    else:
        return v.to(DTYPE).to(tl.float32)


@triton.jit
def _load_input(x_ptr, xm_ptr, k, ok, stride_xk, stride_xmk, GATED: tl.constexpr):
    """``x[k]`` and, with ``GATED``, the prologue's multiplier ``xm[k]`` (else ``x[k]`` again):
    loads only, so the caller can issue them a step ahead and use them later (``_prologue``)."""
    xv = tl.load(x_ptr + k * stride_xk, mask=ok)
    if GATED:
        return xv, tl.load(xm_ptr + k * stride_xmk, mask=ok)
    return xv, xv


@triton.jit
def _as_dtype(v, DTYPE: tl.constexpr):
    """``v`` in DTYPE, rounded to nearest-even (a float32 sum read as the layer's input)."""
    if v.dtype == DTYPE:
        return v
    return _round_to(v.to(tl.float32), DTYPE).to(DTYPE)


@triton.jit
def _prologue(xv, mv, ACT: tl.constexpr, GATED: tl.constexpr):
    """``xv``, or ``act(xv) * mv`` (``ACT``: 1 silu, 2 gelu, 3 gelu_tanh, 4 relu; ``GATED``: times
    ``mv``) rounded to x's dtype after each op as eager rounds."""
    if ACT == 0:
        return xv
    y = xv.to(tl.float32)
    if ACT == 1:
        y = y / (1.0 + tl.exp(-y))  # as torch: silu(-inf) is NaN
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACT == 3:
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (2.0 / (1.0 + tl.exp(-2.0 * z)))  # 1 + tanh(z) = 2 sigmoid(2z)
    else:
        y = tl.where(y < 0.0, 0.0, y)  # NaN stays NaN, as torch's relu
    y = _round_to(y, xv.dtype)
    if GATED:
        y = _round_to(y * mv.to(tl.float32), xv.dtype)
    return y.to(xv.dtype)


@triton.jit
def _kept_value(
    xv,  # [KB] or [BLOCK_R, KB] raw x values (x dtype); out-of-range entries masked by the caller
    k,  # [KB] input-channel indices
    k_ok,  # [KB] k < K
    center_ptr,  # [] or [K] (any float dtype)
    scale_ptr,  # [K]
    thr,  # float32 threshold
    CENTER_MODE: tl.constexpr,  # 0: none, 1: scalar, 2: per channel
    HAS_SCALE: tl.constexpr,
):
    """Keep mask and the kept value ``x - fill`` (0 where dropped), as the reference has them."""
    xf = xv.to(tl.float32)
    if CENTER_MODE == 0:
        d = tl.abs(xf)
        v = xf
    else:
        if CENTER_MODE == 1:
            c = tl.load(center_ptr)
        else:
            c = tl.load(center_ptr + k, mask=k_ok, other=0.0)  # [KB]: broadcasts over rows
        # the mask uses the center in float32, the dropped value is the center in x's dtype
        d = tl.abs(xf - c.to(tl.float32))
        v = xf - _round_to(c.to(tl.float32), xv.dtype)
    if HAS_SCALE:
        d = d * tl.load(scale_ptr + k, mask=k_ok, other=1.0).to(tl.float32)
    keep = ~(d < thr)  # NaN is never below the threshold, so it is kept and propagates
    return keep, tl.where(keep, v, 0.0)


@triton.jit
def _compact(xc, kc, kc_ok, r_ok, n_kept, center_ptr, scale_ptr, thr, scr_ids, scr_val,
             CENTER_MODE: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Append the channels of ``kc`` that any row keeps to the scratch list; the new length."""
    keep, v = _kept_value(xc, kc, kc_ok, center_ptr, scale_ptr, thr, CENTER_MODE, HAS_SCALE)
    any_keep = tl.max((keep & r_ok[:, None] & kc_ok[None, :]).to(tl.int32), axis=0)  # [CHUNK_K]
    slot = n_kept + tl.cumsum(any_keep, axis=0) - 1  # stream compaction
    tl.store(scr_ids + slot, kc.to(tl.float32), mask=any_keep != 0)
    tl.store(scr_val + slot[None, :], v, mask=r_ok[:, None] & (any_keep != 0)[None, :])
    return n_kept + tl.sum(any_keep, axis=0)


@triton.jit
def _member(pid_n, w0_ptr, out0_ptr, bias0_ptr, cb0_ptr, N0, stride_wn0, stride_wk0,
            w1_ptr, out1_ptr, bias1_ptr, cb1_ptr, N1, stride_wn1, stride_wk1,
            w2_ptr, out2_ptr, bias2_ptr, cb2_ptr, N2, stride_wn2, stride_wk2,
            NUM_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """The member (weight, output, biases, N, strides) and N-block of grid column ``pid_n``:
    scalar selects, so one launch serves q/k/v or gate/up together."""
    w_ptr, out_ptr, bias_ptr, cb_ptr = w0_ptr, out0_ptr, bias0_ptr, cb0_ptr
    N, stride_wn, stride_wk, blk = N0, stride_wn0, stride_wk0, pid_n
    if NUM_W > 1:
        nb0 = tl.cdiv(N0, BLOCK_N)
        m1 = pid_n >= nb0
        w_ptr, out_ptr = tl.where(m1, w1_ptr, w_ptr), tl.where(m1, out1_ptr, out_ptr)
        bias_ptr, cb_ptr = tl.where(m1, bias1_ptr, bias_ptr), tl.where(m1, cb1_ptr, cb_ptr)
        N, stride_wn = tl.where(m1, N1, N), tl.where(m1, stride_wn1, stride_wn)
        stride_wk, blk = tl.where(m1, stride_wk1, stride_wk), tl.where(m1, pid_n - nb0, blk)
        if NUM_W > 2:
            nb01 = nb0 + tl.cdiv(N1, BLOCK_N)
            m2 = pid_n >= nb01
            w_ptr, out_ptr = tl.where(m2, w2_ptr, w_ptr), tl.where(m2, out2_ptr, out_ptr)
            bias_ptr, cb_ptr = tl.where(m2, bias2_ptr, bias_ptr), tl.where(m2, cb2_ptr, cb_ptr)
            N, stride_wn = tl.where(m2, N2, N), tl.where(m2, stride_wn2, stride_wn)
            stride_wk, blk = tl.where(m2, stride_wk2, stride_wk), tl.where(m2, pid_n - nb01, blk)
    return w_ptr, out_ptr, bias_ptr, cb_ptr, N, stride_wn, stride_wk, blk


@triton.jit
def _threshold_gemv_kernel(
    x_ptr,  # [R, K] activations, strides (stride_xr, stride_xk)
    # NUM_W members (weights sharing x and the mask), each: weight [N_i, K] with strides
    # (stride_wn_i, stride_wk_i), fast when column-major (1, N_i); output [R, N_i] (row stride
    # N_i); bias and center_bias (= W_i @ center) [N_i], read when HAS_BIAS / HAS_CB
    w0_ptr, out0_ptr, bias0_ptr, cb0_ptr, N0, stride_wn0, stride_wk0,
    w1_ptr, out1_ptr, bias1_ptr, cb1_ptr, N1, stride_wn1, stride_wk1,
    w2_ptr, out2_ptr, bias2_ptr, cb2_ptr, N2, stride_wn2, stride_wk2,
    center_ptr,  # [] or [K] center (read when CENTER_MODE > 0)
    scale_ptr,  # [K] channel scale (read when HAS_SCALE)
    ws_ptr,  # [split_k, R, ws_n] float32 partial sums (when split_k > 1)
    cnt_ptr,  # [n_blocks] int32 arrival counters, zero between launches (when split_k > 1)
    scr_ptr,  # [split_k, 1 + R, split_len] float32 compacted channel ids (row 0) and values
    R,
    K,
    ws_n,  # workspace row length: BLOCK_N x all members' N-blocks
    stride_xr,
    stride_xk,
    threshold,
    split_k,
    split_len,  # channels per K-split
    chunks_per_split,  # masking steps per split: cdiv(split_len, CHUNK_K)
    scr_group,  # N-blocks per scratch copy
    NUM_W: tl.constexpr,  # members: 1, 2 or 3 (grid axis 0 runs over all their N-blocks)
    CENTER_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CB: tl.constexpr,
    BLOCK_R: tl.constexpr,  # 1 (FMA), or rows padded to a power of two >= 16 (tensor cores)
    EPI_R: tl.constexpr,  # rows padded to a power of two (epilogue)
    BLOCK_N: tl.constexpr,  # output columns per program
    CHUNK_K: tl.constexpr,  # channels masked and compacted per step
    SUB_K: tl.constexpr,  # kept channels per weight tile
    USE_DOT: tl.constexpr,  # tensor-core product for several rows; FMA for one
    DOT_FP32: tl.constexpr,
    SPLIT_GROUP: tl.constexpr,  # partial tiles summed per load in the epilogue
    ONE_STEP: tl.constexpr,  # the split is masked in one step (CHUNK_K >= split_len)
):
    pid_n = tl.program_id(0)  # N-block over all members
    pid_k = tl.program_id(1)
    thr = tl.cast(threshold, tl.float32)  # Inductor passes Python floats as fp64: compare in fp32

    w_ptr, out_ptr, bias_ptr, cb_ptr, N, stride_wn, stride_wk, blk = _member(
        pid_n, w0_ptr, out0_ptr, bias0_ptr, cb0_ptr, N0, stride_wn0, stride_wk0,
        w1_ptr, out1_ptr, bias1_ptr, cb1_ptr, N1, stride_wn1, stride_wk1,
        w2_ptr, out2_ptr, bias2_ptr, cb2_ptr, N2, stride_wn2, stride_wk2, NUM_W, BLOCK_N)

    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_c = tl.arange(0, CHUNK_K)
    offs_s = tl.arange(0, SUB_K)

    # ---- phase 1: keep mask of this split's channels, compacted into the scratch -------------
    # Every N-block of a split computes the same list. Groups of scr_group N-blocks share a
    # scratch copy, all members writing the same values to the same slots (a benign race):
    # one copy per split had 100-200 SMs storing to the same lines, which L2 serialised, and
    # one per program costs the L2 write-back of megabytes of scratch (docs/performance.md).
    k_first = pid_k * split_len
    k_end = tl.minimum(K, k_first + split_len)
    scr_row = pid_k.to(tl.int64) * tl.cdiv(ws_n // BLOCK_N, scr_group) + pid_n // scr_group
    scr_ids = scr_ptr + scr_row * (1 + R) * split_len  # [split_len] channel ids
    scr_val = scr_ids + (1 + offs_r[:, None]) * split_len  # [BLOCK_R, 1] rows of values
    x_rows = x_ptr + offs_r[:, None] * stride_xr
    if ONE_STEP:  # the whole split at once: one load latency, no prefetch registers
        kc = k_first + offs_c
        kc_ok = kc < k_end
        xc = tl.load(x_rows + kc[None, :] * stride_xk, mask=r_ok[:, None] & kc_ok[None, :])
        n_kept = _compact(xc, kc, kc_ok, r_ok, 0, center_ptr, scale_ptr, thr, scr_ids, scr_val,
                          CENTER_MODE, HAS_SCALE)
    else:
        n_kept = 0
        xc_next = tl.load(
            x_rows + (k_first + offs_c)[None, :] * stride_xk,
            mask=r_ok[:, None] & (k_first + offs_c < k_end)[None, :],
        )
        for ci in range(0, chunks_per_split):
            kc = k_first + ci * CHUNK_K + offs_c
            kc_ok = kc < k_end
            xc = xc_next
            kn = kc + CHUNK_K  # prefetch the next chunk: its latency hides behind this one
            xc_next = tl.load(x_rows + kn[None, :] * stride_xk, mask=r_ok[:, None] & (kn < k_end)[None, :])
            n_kept = _compact(xc, kc, kc_ok, r_ok, n_kept, center_ptr, scale_ptr, thr, scr_ids, scr_val,
                              CENTER_MODE, HAS_SCALE)
    tl.debug_barrier()  # the scratch is read back by other threads of this program

    # ---- phase 2: read only the kept rows of Wᵀ, one tile ahead (no barriers in this loop) ----
    if USE_DOT:
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    else:  # one row: per-slot FMAs in the weight tile's own layout, reduced once at the end
        acc = tl.zeros((SUB_K, BLOCK_N), dtype=tl.float32)
    # software pipeline: the ids of tile t+2 and the weights of tile t+1 are in flight while
    # tile t is accumulated, so no load waits on another inside an iteration
    s_ok = offs_s < n_kept
    k = tl.load(scr_ids + offs_s, mask=s_ok, other=0.0).to(tl.int32)
    w_next = tl.load(
        w_ptr + k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :] * stride_wn,
        mask=s_ok[:, None] & n_ok[None, :],
        other=0.0,
    )  # [SUB_K, BLOCK_N]
    v_next = tl.load(scr_val + offs_s[None, :], mask=r_ok[:, None] & s_ok[None, :], other=0.0)
    k_next = tl.load(scr_ids + SUB_K + offs_s, mask=SUB_K + offs_s < n_kept, other=0.0)
    for t in range(0, tl.cdiv(n_kept, SUB_K)):
        w = w_next
        v = v_next  # [BLOCK_R, SUB_K] float32, each row's own mask applied
        slot = (t + 1) * SUB_K + offs_s
        s_ok = slot < n_kept  # past the end: fully masked loads, no memory traffic
        k = k_next.to(tl.int32)
        w_next = tl.load(
            w_ptr + k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=s_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        v_next = tl.load(scr_val + slot[None, :], mask=r_ok[:, None] & s_ok[None, :], other=0.0)
        k_next = tl.load(scr_ids + SUB_K + slot, mask=SUB_K + slot < n_kept, other=0.0)
        # accumulate in float32
        if USE_DOT:
            acc = _dot_acc(acc, v, w, DOT_FP32, CENTER_MODE > 0)
        else:
            acc += tl.sum(v, axis=0)[:, None] * w.to(tl.float32)

    if USE_DOT:
        part = acc
    else:
        part = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]

    # ---- epilogue: add biases and store, combining K-splits in the last-arriving program -----
    if split_k > 1:
        offs_w = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # this tile's workspace columns
        ws_tile = (offs_r[:, None] * ws_n + offs_w[None, :]).to(tl.int64)
        tl.store(ws_ptr + pid_k.to(tl.int64) * R * ws_n + ws_tile, part, mask=r_ok[:, None] & n_ok[None, :])
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == split_k - 1:
            offs_e = tl.arange(0, EPI_R)
            e_ok = (offs_e < R)[:, None] & n_ok[None, :]
            e_tile = (offs_e[:, None] * ws_n + offs_w[None, :]).to(tl.int64)
            offs_g = tl.arange(0, SPLIT_GROUP)
            total = tl.zeros((EPI_R, BLOCK_N), dtype=tl.float32)
            for g0 in range(0, split_k, SPLIT_GROUP):
                sp = g0 + offs_g
                parts = tl.load(
                    ws_ptr + sp.to(tl.int64)[:, None, None] * R * ws_n + e_tile[None, :, :],
                    mask=(sp < split_k)[:, None, None] & e_ok[None, :, :],
                    other=0.0,
                    cache_modifier=".cg",  # written by other SMs: read from L2, not a stale L1
                )
                total += tl.sum(parts, axis=0)
            _store_out(total, out_ptr, bias_ptr, cb_ptr, offs_e, offs_n, n_ok, e_ok, N, HAS_BIAS, HAS_CB)
            # ready for the next launch; relaxed, after the output store: the launch boundary
            # orders it, and an acq_rel exchange here put a GPU-wide fence before the store
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
    else:
        _store_out(
            part,
            out_ptr,
            bias_ptr,
            cb_ptr,
            offs_r,
            offs_n,
            n_ok,
            r_ok[:, None] & n_ok[None, :],
            N,
            HAS_BIAS,
            HAS_CB,
        )


@triton.jit
def _dot_acc(acc, v, w, DOT_FP32: tl.constexpr, SPLIT_LO: tl.constexpr):
    """``acc + v @ w`` on tensor cores, float32 accumulation: ``v`` ([rows, SUB_K] float32) in
    the weight's 16-bit dtype plus, with ``SPLIT_LO`` (x - c is not exact in 16 bits), its
    rounding error in a second product; ``DOT_FP32`` (fp32 weights, or the CPU interpreter,
    which mis-multiplies 16-bit dots): exact IEEE products."""
    if DOT_FP32:
        return tl.dot(v, _dequant(w), acc, input_precision="ieee")
    v_hi = v.to(w.dtype)
    acc = tl.dot(v_hi, w, acc)
    if SPLIT_LO:
        v_lo = v - v_hi.to(tl.float32)
        v_lo = tl.where(v_lo == v_lo, v_lo, 0.0)  # inf - inf: hi carries the inf
        acc = tl.dot(v_lo.to(w.dtype), w, acc)
    return acc


@triton.jit
def _store_out(
    part,
    out_ptr,
    bias_ptr,
    cb_ptr,
    offs_r,
    offs_n,
    n_ok,
    out_ok,
    N,
    HAS_BIAS: tl.constexpr,
    HAS_CB: tl.constexpr,
):
    if HAS_BIAS:
        part += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_CB:
        part += tl.load(cb_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_r[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out, part.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit(do_not_specialize=["stride_xk", "stride_xmk"])  # x's loads scalar: no layout conversion
def _row_gemv_kernel(
    x_ptr,  # [K] activations (one row), stride stride_xk; with a prologue, its argument a
    xm_ptr,  # [K] with GATED: the prologue's multiplier b (x = act(a) * b), stride stride_xmk
    # members as in _threshold_gemv_kernel (weights sharing x and the mask)
    w0_ptr, out0_ptr, bias0_ptr, cb0_ptr, N0, stride_wn0, stride_wk0,
    w1_ptr, out1_ptr, bias1_ptr, cb1_ptr, N1, stride_wn1, stride_wk1,
    w2_ptr, out2_ptr, bias2_ptr, cb2_ptr, N2, stride_wn2, stride_wk2,
    # with QUANT, each member's per-output-channel float32 weight scale [N_i] and its stride
    wsc0_ptr, wsc1_ptr, wsc2_ptr, stride_sc0, stride_sc1, stride_sc2,
    center_ptr,  # [] or [K] center (read when CENTER_MODE > 0)
    scale_ptr,  # [K] channel scale (read when HAS_SCALE)
    ws_ptr,  # [split_k, ws_n] float32 partial sums (when split_k > 1)
    cnt_ptr,  # [n_blocks] int32 arrival counters, zero between launches (when split_k > 1)
    scr_ptr,  # [split_k x groups, 2, split_len] float32 compacted channel ids and kept values
    zero_ptr,  # [zero_n] float32 written with zeros (with ZERO): the next accumulating call's output
    zero_n,
    zero_per_prog,  # zeros each program writes
    K,
    ws_n,  # workspace row length: BLOCK_N x all members' N-blocks
    stride_xk,
    stride_xmk,
    R,  # rows (BLOCK_R > 1)
    stride_xr,
    stride_xmr,
    threshold,
    split_k,
    split_len,  # channels per K-split
    steps,  # masking steps per split: cdiv(split_len, CHUNK_K)
    scr_group,  # N-blocks per scratch copy
    NUM_W: tl.constexpr,
    XDT: tl.constexpr,  # the layer's activation dtype: x (a float32 sum, or the prologue) rounds to it
    QUANT: tl.constexpr,  # 8-bit weights (int8 or fp8 e4m3) with per-output-channel scales
    BLOCK_R: tl.constexpr,  # 1, or rows padded to a power of two (>= 16 with USE_DOT)
    USE_DOT: tl.constexpr,  # several rows: tensor-core products (else FMAs, BLOCK_R <= 4)
    DOT_FP32: tl.constexpr,
    CENTER_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CB: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output columns per program
    CHUNK_K: tl.constexpr,  # channels masked and compacted per step
    SUB_K: tl.constexpr,  # kept channels per weight tile
    SPLIT_GROUP: tl.constexpr,  # partial tiles summed per load in the epilogue
    ACC_TILE: tl.constexpr,  # accumulate [SUB_K, BLOCK_N] (else reduce each tile to [BLOCK_N])
    PDL: tl.constexpr,  # launched as a programmatic dependent: wait for the previous grid here
    ACT: tl.constexpr,  # input prologue (_prologue): 0 none, else x = act(a) [* b]
    GATED: tl.constexpr,
    ACCUM: tl.constexpr,  # outputs are float32 sums: every program adds its partial (atomics)
    ZERO: tl.constexpr,
    STAGES: tl.constexpr,  # weight loop: 0 hand-pipelined one tile ahead, else Triton's, this deep
    ATOMIC_EPI: tl.constexpr,  # split-K by atomics into ws (zero between launches), not partials
):
    """One row, every tensor 1-D or [SUB_K, BLOCK_N]: few layout conversions, so few barriers
    (the row-generic kernel's [1, C] shapes cost ~28 per launch), and few enough registers for
    one- or two-warp programs, whose scans and reductions stay inside a warp.

    With ``BLOCK_R > 1`` (several rows; Triton's weight pipeline and the atomic or single-split
    epilogue only) the same stream with [BLOCK_R, ...] masks, values and accumulators (FMAs, or
    ``USE_DOT``: tensor cores): a row of Wᵀ is read once if any row keeps its channel, and each
    row adds only the values it keeps."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    thr = tl.cast(threshold, tl.float32)
    w_ptr, out_ptr, bias_ptr, cb_ptr, N, stride_wn, stride_wk, blk = _member(
        pid_n, w0_ptr, out0_ptr, bias0_ptr, cb0_ptr, N0, stride_wn0, stride_wk0,
        w1_ptr, out1_ptr, bias1_ptr, cb1_ptr, N1, stride_wn1, stride_wk1,
        w2_ptr, out2_ptr, bias2_ptr, cb2_ptr, N2, stride_wn2, stride_wk2, NUM_W, BLOCK_N)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_c = tl.arange(0, CHUNK_K)
    offs_s = tl.arange(0, SUB_K)
    if PDL:  # everything above is arithmetic; x, the scratch and the counters come after this
        gdc_wait()
    if ZERO:  # plain stores, nothing waits on them; ordered before the next launch by its boundary
        zb = tl.arange(0, 64)
        z0 = (pid_k * tl.num_programs(0) + pid_n) * zero_per_prog
        for i in range(0, zero_per_prog, 64):
            tl.store(zero_ptr + z0 + i + zb, 0.0, mask=(i + zb < zero_per_prog) & (z0 + i + zb < zero_n))

    # ---- phase 1: compact this split's kept channels (ids, x - fill) into the scratch -------
    k_first = pid_k * split_len
    k_end = tl.minimum(K, k_first + split_len)
    scr_row = pid_k.to(tl.int64) * tl.cdiv(ws_n // BLOCK_N, scr_group) + pid_n // scr_group
    scr_ids = scr_ptr + scr_row * (1 + BLOCK_R) * split_len
    scr_val = scr_ids + split_len  # BLOCK_R rows of kept values follow the ids
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    if BLOCK_R == 1:
        n_kept = 0
        kc = k_first + offs_c
        xc_next, mc_next = _load_input(x_ptr, xm_ptr, kc, kc < k_end, stride_xk, stride_xmk, GATED)
        for _ in range(0, steps):
            kc_ok = kc < k_end
            xc = _prologue(_as_dtype(xc_next, XDT), _as_dtype(mc_next, XDT), ACT, GATED)
            kn = kc + CHUNK_K  # the next step's x is in flight while this one is compacted
            xc_next, mc_next = _load_input(x_ptr, xm_ptr, kn, kn < k_end, stride_xk, stride_xmk, GATED)
            keep, v = _kept_value(xc, kc, kc_ok, center_ptr, scale_ptr, thr, CENTER_MODE, HAS_SCALE)
            keep = keep & kc_ok
            kept = keep.to(tl.int32)
            slot = n_kept + tl.cumsum(kept, axis=0) - 1
            tl.store(scr_ids + slot, kc.to(tl.float32), mask=keep)
            tl.store(scr_val + slot, v, mask=keep)
            n_kept += tl.sum(kept, axis=0)
            kc = kn
    else:
        n_kept = _compact_rows(x_ptr, xm_ptr, k_first, k_end, steps, offs_r, r_ok, stride_xr, stride_xk,
                               stride_xmr, stride_xmk, center_ptr, scale_ptr, thr, scr_ids, scr_val,
                               split_len, XDT, CHUNK_K, CENTER_MODE, HAS_SCALE, ACT, GATED)
    tl.debug_barrier()  # the scratch is read back by other threads of this program

    # ---- phase 2: the kept rows of Wᵀ ------------------------------------------------------
    if BLOCK_R > 1:  # [BLOCK_R, BLOCK_N], reduced over each tile's slots
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    elif ACC_TILE:  # per-slot partial sums, reduced once at the end
        acc = tl.zeros((SUB_K, BLOCK_N), dtype=tl.float32)
    else:  # reduced every tile (fewer registers: larger tiles fit one warp)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if BLOCK_R > 1 or STAGES > 0:  # Triton's pipeline: a cp.async ring of STAGES - 1 tiles in shared memory
        for t in tl.range(0, tl.cdiv(n_kept, SUB_K), num_stages=STAGES):
            slot = t * SUB_K + offs_s
            s_ok = slot < n_kept
            k = tl.load(scr_ids + slot, mask=s_ok, other=0.0).to(tl.int32)
            if BLOCK_R > 1:  # [BLOCK_R, SUB_K]
                v = tl.load(scr_val + offs_r[:, None] * split_len + slot[None, :],
                            mask=r_ok[:, None] & s_ok[None, :], other=0.0)
            else:
                v = tl.load(scr_val + slot, mask=s_ok, other=0.0)
            w = _kept_rows(w_ptr, k, s_ok, offs_n, n_ok, stride_wk, stride_wn)
            if BLOCK_R == 1:
                acc = _accumulate(acc, v, w, ACC_TILE)
            elif USE_DOT:
                acc = _dot_acc(acc, v, w, DOT_FP32, CENTER_MODE > 0)
            else:
                acc += tl.sum(v[:, :, None] * _dequant(w)[None, :, :], axis=1)
    else:  # by hand: ids two tiles ahead, weights one
        s_ok = offs_s < n_kept
        k = tl.load(scr_ids + offs_s, mask=s_ok, other=0.0).to(tl.int32)
        v_next = tl.load(scr_val + offs_s, mask=s_ok, other=0.0)
        w_next = _kept_rows(w_ptr, k, s_ok, offs_n, n_ok, stride_wk, stride_wn)
        k_next = tl.load(scr_ids + SUB_K + offs_s, mask=SUB_K + offs_s < n_kept, other=0.0)
        for t in range(0, tl.cdiv(n_kept, SUB_K)):
            w = w_next
            v = v_next
            slot = (t + 1) * SUB_K + offs_s
            s_ok = slot < n_kept  # past the end: fully masked loads, no memory traffic
            k = k_next.to(tl.int32)
            v_next = tl.load(scr_val + slot, mask=s_ok, other=0.0)
            w_next = _kept_rows(w_ptr, k, s_ok, offs_n, n_ok, stride_wk, stride_wn)
            k_next = tl.load(scr_ids + SUB_K + slot, mask=SUB_K + slot < n_kept, other=0.0)
            acc = _accumulate(acc, v, w, ACC_TILE)
    if ACC_TILE and BLOCK_R == 1:
        part = tl.sum(acc, axis=0)  # [BLOCK_N]
    else:
        part = acc  # [BLOCK_N], or [BLOCK_R, BLOCK_N]
    if QUANT:  # scale each partial (linear: the split-K sums and atomics below add scaled values)
        sc_ptr, stride_sc = _member_scale(pid_n, wsc0_ptr, wsc1_ptr, wsc2_ptr, stride_sc0, stride_sc1,
                                          stride_sc2, N0, N1, NUM_W, BLOCK_N)
        sc = tl.load(sc_ptr + offs_n * stride_sc, mask=n_ok, other=0.0)
        if BLOCK_R > 1:
            part = part * sc[None, :]
        else:
            part = part * sc

    # ---- epilogue: the last-arriving split sums the partials in order, adds biases, stores ---
    offs_w = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # this N-block's workspace columns
    if ACCUM:  # or every split adds its partial to the float32 output, fire and forget
        if pid_k == 0:
            part = _with_biases(part, bias_ptr, cb_ptr, offs_n, n_ok, HAS_BIAS, HAS_CB)
        tl.atomic_add(out_ptr + offs_n, part, mask=n_ok, sem="relaxed")
    elif BLOCK_R > 1:  # sums and outputs [R, ws_n] and [R, N]; atomic split-K or a single split
        out_tile = out_ptr + offs_r[:, None] * N + offs_n[None, :]
        ok = r_ok[:, None] & n_ok[None, :]
        if ATOMIC_EPI:
            _atomic_epilogue(part, ws_ptr + offs_r[:, None] * ws_n + offs_w[None, :], ok, cnt_ptr + pid_n,
                             split_k, out_tile, bias_ptr, cb_ptr, offs_n, n_ok, HAS_BIAS, HAS_CB)
        else:
            part = _with_biases(part, bias_ptr, cb_ptr, offs_n, n_ok, HAS_BIAS, HAS_CB)
            tl.store(out_tile, part.to(out_ptr.dtype.element_ty), mask=ok)
    elif split_k > 1 and ATOMIC_EPI:  # partials summed by atomics; the last split rounds them
        _atomic_epilogue(part, ws_ptr + offs_w, n_ok, cnt_ptr + pid_n, split_k, out_ptr + offs_n,
                         bias_ptr, cb_ptr, offs_n, n_ok, HAS_BIAS, HAS_CB)
    elif split_k > 1:
        tl.store(ws_ptr + pid_k.to(tl.int64) * ws_n + offs_w, part, mask=n_ok)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == split_k - 1:
            offs_g = tl.arange(0, SPLIT_GROUP)
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for g0 in range(0, split_k, SPLIT_GROUP):
                sp = g0 + offs_g
                parts = tl.load(ws_ptr + sp.to(tl.int64)[:, None] * ws_n + offs_w[None, :],
                                mask=(sp < split_k)[:, None] & n_ok[None, :], other=0.0,
                                cache_modifier=".cg")  # written by other SMs: from L2
                total += tl.sum(parts, axis=0)
            _store_row(total, out_ptr, bias_ptr, cb_ptr, offs_n, n_ok, HAS_BIAS, HAS_CB)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")  # ready for the next launch
    else:
        _store_row(part, out_ptr, bias_ptr, cb_ptr, offs_n, n_ok, HAS_BIAS, HAS_CB)


@triton.jit
def _atomic_epilogue(part, ws_tile, ok, cnt_ptr, split_k, out_tile, bias_ptr, cb_ptr, offs_n, n_ok,
                     HAS_BIAS: tl.constexpr, HAS_CB: tl.constexpr):
    """Split-K by float32 atomics into the zeroed sums ``ws_tile``, then arrive; the split that
    arrives last reads the sums, zeroes them for the next launch, adds the biases and stores;
    the counter is reset last."""
    tl.atomic_add(ws_tile, part, mask=ok, sem="relaxed")
    tl.debug_barrier()  # every thread's additions are issued before the release below
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if arrived == split_k - 1:
        total = tl.load(ws_tile, mask=ok, other=0.0, cache_modifier=".cg")
        # Triton loads the sums and stores the zeros in different thread layouts, so a column's
        # zero could land before its load (outputs of 0: seen on the H200)
        tl.debug_barrier()
        tl.store(ws_tile, 0.0, mask=ok)
        total = _with_biases(total, bias_ptr, cb_ptr, offs_n, n_ok, HAS_BIAS, HAS_CB)
        tl.store(out_tile, total.to(out_tile.dtype.element_ty), mask=ok)
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed")


@triton.jit
def _compact_rows(x_ptr, xm_ptr, k_first, k_end, steps, offs_r, r_ok, stride_xr, stride_xk, stride_xmr,
                  stride_xmk, center_ptr, scale_ptr, thr, scr_ids, scr_val, split_len, XDT: tl.constexpr,
                  CHUNK_K: tl.constexpr, CENTER_MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
                  ACT: tl.constexpr, GATED: tl.constexpr):
    """Phase 1 for several rows: the split's channels that any row keeps, compacted (ids, and
    per row its kept value or 0); the list's length."""
    n_kept = 0
    kc = k_first + tl.arange(0, CHUNK_K)
    for _ in range(0, steps):
        kc_ok = kc < k_end
        ok = r_ok[:, None] & kc_ok[None, :]
        xv, mv = _load_input(x_ptr + offs_r[:, None] * stride_xr, xm_ptr + offs_r[:, None] * stride_xmr,
                             kc[None, :], ok, stride_xk, stride_xmk, GATED)
        xc = _prologue(_as_dtype(xv, XDT), _as_dtype(mv, XDT), ACT, GATED)
        keep, v = _kept_value(xc, kc, kc_ok, center_ptr, scale_ptr, thr, CENTER_MODE, HAS_SCALE)
        any_keep = tl.max((keep & ok).to(tl.int32), axis=0)  # [CHUNK_K]
        slot = n_kept + tl.cumsum(any_keep, axis=0) - 1
        tl.store(scr_ids + slot, kc.to(tl.float32), mask=any_keep != 0)
        tl.store(scr_val + offs_r[:, None] * split_len + slot[None, :], v,
                 mask=r_ok[:, None] & (any_keep != 0)[None, :])
        n_kept += tl.sum(any_keep, axis=0)
        kc += CHUNK_K
    return n_kept


@triton.jit
def _kept_rows(w_ptr, k, s_ok, offs_n, n_ok, stride_wk, stride_wn):
    """[SUB_K, BLOCK_N] tile of Wᵀ: rows ``k`` (``s_ok``: slot in use; others move no bytes)."""
    return tl.load(w_ptr + k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                   mask=s_ok[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _dequant(w):
    """A weight tile in float32. int8 without I2F, which sm_90 issues at 16 per SM per clock
    (an 8-bit stream at ~3 TB/s needs ~12 values per SM per clock): the value is added to the
    bits of 1.5 * 2^23, where one unit of the mantissa is 1.0, and that float is subtracted
    (integer add, float add; exact for |q| < 2^22). fp8 e4m3 and 16-bit: Triton's conversion
    (fp8 pairs through cvt to f16x2 on sm_90). Scales are applied to the partial sums."""
    if w.dtype == tl.int8:
        return (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    return w.to(tl.float32)


@triton.jit
def _accumulate(acc, v, w, ACC_TILE: tl.constexpr):
    """``acc`` plus the tile's products in float32: per slot (ACC_TILE) or reduced over slots."""
    if ACC_TILE:
        return acc + v[:, None] * _dequant(w)
    return acc + tl.sum(v[:, None] * _dequant(w), axis=0)


@triton.jit
def _member_scale(pid_n, s0_ptr, s1_ptr, s2_ptr, stride0, stride1, stride2, N0, N1, NUM_W: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """The weight scale (pointer, stride) of grid column ``pid_n``'s member (as ``_member``)."""
    s_ptr, stride = s0_ptr, stride0
    if NUM_W > 1:
        nb0 = tl.cdiv(N0, BLOCK_N)
        m1 = pid_n >= nb0
        s_ptr, stride = tl.where(m1, s1_ptr, s_ptr), tl.where(m1, stride1, stride)
        if NUM_W > 2:
            m2 = pid_n >= nb0 + tl.cdiv(N1, BLOCK_N)
            s_ptr, stride = tl.where(m2, s2_ptr, s_ptr), tl.where(m2, stride2, stride)
    return s_ptr, stride


@triton.jit
def _with_biases(part, bias_ptr, cb_ptr, offs_n, n_ok, HAS_BIAS: tl.constexpr, HAS_CB: tl.constexpr):
    """One row's float32 ``part`` plus the bias and the center bias (where present)."""
    if HAS_BIAS:
        part += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_CB:
        part += tl.load(cb_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    return part


@triton.jit
def _store_row(part, out_ptr, bias_ptr, cb_ptr, offs_n, n_ok, HAS_BIAS: tl.constexpr, HAS_CB: tl.constexpr):
    part = _with_biases(part, bias_ptr, cb_ptr, offs_n, n_ok, HAS_BIAS, HAS_CB)
    tl.store(out_ptr + offs_n, part.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _masked_input_kernel(
    x_ptr,  # [R, K], strides (stride_xr, stride_xk)
    center_ptr,  # [] or [K] (any float dtype)
    scale_ptr,  # [K]
    out_ptr,  # [R, K] contiguous, x's dtype
    R,
    K,
    stride_xr,
    stride_xk,
    threshold,
    CENTER_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``where(keep, x, center)``: the op's masked input in one pass (several-row calls)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    ok = (offs_r < R)[:, None] & k_ok[None, :]
    xv = tl.load(x_ptr + offs_r[:, None].to(tl.int64) * stride_xr + k[None, :] * stride_xk, mask=ok)
    keep, v = _kept_value(xv, k, k_ok, center_ptr, scale_ptr, tl.cast(threshold, tl.float32),
                          CENTER_MODE, HAS_SCALE)
    if CENTER_MODE == 0:
        out = tl.where(keep, xv, 0.0)
    else:
        if CENTER_MODE == 1:
            c = tl.load(center_ptr).to(tl.float32)
        else:
            c = tl.load(center_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        out = tl.where(keep, xv, _round_to(c, xv.dtype).to(xv.dtype))
    tl.store(out_ptr + offs_r[:, None].to(tl.int64) * K + k[None, :], out, mask=ok)


def masked_input(
    x: Tensor, threshold: float, center: Tensor | None = None, channel_scale: Tensor | None = None
) -> Tensor:
    """``where(|x - center| * scale >= threshold, x, center)`` in one kernel (any rows, any layout).

    The op's path for more rows than the GEMV takes: the reference composition ran 6-8
    elementwise kernels per call (a cost that dominates under CUDA graphs at batch 2-16).
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out.view(x.shape)
    rows = x2.shape[0]
    block_k = min(1024, triton.next_power_of_2(k))
    block_r = max(1, min(_next_pow2(rows), 4096 // block_k))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
    _masked_input_kernel[grid](
        x2,
        center if center is not None else x2,
        channel_scale if channel_scale is not None else x2,
        out,
        rows,
        k,
        x2.stride(0),
        x2.stride(1),
        float(threshold),
        CENTER_MODE=0 if center is None else (1 if center.dim() == 0 else 2),
        HAS_SCALE=channel_scale is not None,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
    )
    return out.view(x.shape)


# -- launch configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class GemvConfig:
    """Block sizes of one launch (a fixed function of shape and dtype; see ``_pick_config``)."""

    block_n: int
    chunk_k: int  # channels masked and compacted per step (a power of two)
    sub_k: int
    block_r: int
    use_dot: bool
    split_k: int
    split_len: int  # channels per K-split
    num_warps: int = 4
    num_stages: int = 1
    scratch_group: int = 8  # N-blocks that share one copy of a split's compaction scratch
    row_kernel: bool = False  # one row: _row_gemv_kernel (1-D phases) instead of the row-generic one
    acc_tile: bool = True  # row kernel: [SUB_K, BLOCK_N] accumulator (else reduced every tile)
    epi_floats: int = 16  # row kernel: partial sums per thread per load of the split-K epilogue
    pdl: bool = False  # row kernel: programmatic dependent launch (sm_90+), see _pdl_ok
    stages: int = 0  # row kernel: weight loop pipelined by Triton this deep (0: by hand, one ahead)
    atomic_epilogue: bool = False  # row kernel: split-K sums by atomics into a zeroed workspace

    @property
    def chunks_per_split(self) -> int:
        return triton.cdiv(self.split_len, self.chunk_k)


def _uninitialised(n: int, device: torch.device) -> Tensor:
    """float32 memory for the zeros an accumulating launch writes (tests fill it with NaN)."""
    return torch.empty(n, dtype=torch.float32, device=device)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _rows_block(rows: int, use_dot: bool) -> int:
    """Rows padded to a power of two; tensor-core products need at least 16."""
    return max(16, _next_pow2(rows)) if use_dot else _next_pow2(rows)


# Programmatic dependent launch for the one-row kernel (H200, docs/performance.md). Back to
# back in a CUDA graph it saves 0.4-0.7 µs per call on every decode shape. In a compiled decode
# step the GEMVs follow Inductor kernels, and there it pays only when those kernels signal their
# dependents early, i.e. with Inductor's own ``triton.enable_pdl`` (Llama-3-8B, 50%: 3.834 ->
# 3.749 ms with it; 3.832 -> 3.884 ms without it). ``None``: follow that flag; a bool forces it.
ROW_PDL: bool | None = None


def _row_pdl() -> bool:
    if ROW_PDL is not None:
        return ROW_PDL
    inductor = sys.modules.get("torch._inductor.config")  # never imported: no Inductor graphs
    return bool(inductor is not None and getattr(inductor.triton, "enable_pdl", False))


_SMALL_WEIGHT = 32 * 2**20  # elements: 4096x4096 (o_proj) and 6144x4096 (q/k/v as one group)
_LARGE_WEIGHT = 100 * 2**20  # elements: the 70B-class shapes and gate/up as one group


# One-row launches that stream 4 KB runs of each kept row (H200,
# ``bench/results/gemv_stream_long_h200.md``; the "stream" rule below). block_n in bytes here.
_STREAM = dict(num_warps=8, block_n=4096, sub_k=1, tile_bytes=16384, programs_per_sm=1, chunk_k=32,
               one_step_max=1024, scratch_group=1, max_split=256, stages=4, acc_tile=True,
               atomic_epilogue=True)


def _row_defaults(n: int, k: int, elem_size: int, accumulate: bool = False,
                  deterministic: bool = False) -> dict:
    """One-row kernel block sizes: the stream rule, or by weight size the rules below.

    **Stream** (every launch but deterministic ones): one eight-warp program per SM, each an
    N-block of 4 KB of every kept row of Wᵀ over a short K-split (32-1024 channels), its rows
    streamed through a 4-deep cp.async ring of 16 KB tiles; the split-K partials are summed by
    float32 atomics (into the output when accumulating, else into a zeroed workspace whose
    last-arriving split rounds and stores them). On the H200 the op ran 0.95-1.08x cuBLAS at
    s = 0, 1.29-1.95x at 0.5 and 2.0-6.7x at 0.9 on the five benchmark shapes (``gemv_h200.md``),
    the rules below 0.84-0.95x, 1.15-1.69x and 1.8-5.3x: what limited those was not bytes in
    flight but the DRAM efficiency of 128-256-byte runs scattered over rows
    (``docs/performance.md``; ``gemv_stream_long_h200.md``). The addition order of atomics varies from run to
    run, so under ``torch.use_deterministic_algorithms`` the rules below run instead.

    By weight size (H200 sweeps, docs/performance.md), deterministic:

    Programs of one or two warps keep scans and reductions inside a warp: the fixed cost
    (τ = ∞) fell from 6.4-16.7 µs (four warps) to 4.8-9.4 µs. What separates the rules is bytes
    in flight per SM at low sparsity, i.e. programs per SM x bytes per tile:
    * small weights: one warp, 256-byte runs, 16-row tiles reduced per tile, and 128-channel
      splits so the grid still has ~8 programs per SM (4096²: 0.85/1.13/1.77x cuBLAS at
      s = 0/0.5/0.9; 256-channel splits: 0.65/0.97/1.77x);
    * mid (the 8B MLP shapes): two warps, 128-byte runs, 8-row tiles (14336x4096:
      0.86/1.38/2.77x; one warp within ±3%, 4096x14336 up to 13% slower at s = 0.9);
    * large (70B shapes, gate/up grouped): one warp, 256-byte runs, 256-channel splits
      (28672x8192: 0.93/1.69/5.34x).
    Every rule sums all split-K partials in one load where 64 floats per thread hold them.
    Accumulating launches are never deterministic.
    """
    if accumulate or not deterministic:
        # two programs per SM when accumulating: in Llama-3-8B's decode chain 28.96 / 18.17 / 7.60
        # µs per call at s = 0 / 0.5 / 0.9 against one per SM's 29.71 / 18.26 / 7.41 (H200): in
        # q/k/v as one group k's and v's N-blocks are half as wide as q's, which one program per
        # SM leaves uneven
        return dict(_STREAM, block_n=_STREAM["block_n"] // elem_size, programs_per_sm=2 if accumulate else 1)
    one_warp = dict(num_warps=1, block_n=256 // elem_size, sub_k=16, acc_tile=False, epi_floats=64)
    if n * k < _SMALL_WEIGHT:
        return dict(one_warp, chunk_k=128)
    if n * k < _LARGE_WEIGHT:
        return dict(num_warps=2, block_n=128 // elem_size, sub_k=8, acc_tile=True, epi_floats=64)
    return one_warp


def _pick_config(rows: int, n: int, k: int, elem_size: int, num_sms: int, accumulate: bool = False,
                 deterministic: bool | None = None, **overrides) -> GemvConfig:
    """Deterministic block sizes from shape and dtype (no autotuning at call time); keyword
    overrides of ``_block_config``'s parameters are for tests and benchmarks. ``deterministic``
    (default: ``torch.are_deterministic_algorithms_enabled()``) picks rules whose result does
    not depend on the order in which programs finish. Several rows (up to
    ``MAX_ROW_KERNEL_ROWS``) take the one-row kernel's stream with ``row_kernel=True`` and
    not deterministic (by default up to ``_STREAM_MAX_ROWS``); otherwise the row-generic kernel."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    several = (1 < rows <= MAX_ROW_KERNEL_ROWS and not deterministic
               and overrides.get("row_kernel", rows <= _STREAM_MAX_ROWS))
    if (rows == 1 and overrides.get("row_kernel", True)) or several:
        base = dict(row_kernel=True, programs_per_sm=16, chunk_k=256, one_step_max=256, pdl=_row_pdl())
        base.update(_row_defaults(n, k, elem_size, accumulate, deterministic))
        return _block_config(rows, n, k, elem_size, num_sms, **{**base, **overrides})
    return _block_config(rows, n, k, elem_size, num_sms, **{**overrides, "row_kernel": False})


@functools.lru_cache(maxsize=1024)
def _block_config(
    rows: int,
    n: int,
    k: int,
    elem_size: int,
    num_sms: int,
    programs_per_sm: int = 8,
    block_n: int | None = None,
    chunk_k: int = 256,
    one_step_max: int = 512,
    scratch_group: int = 8,
    sub_k: int = 16,
    row_kernel: bool = False,
    num_warps: int = 4,
    acc_tile: bool = True,
    epi_floats: int = 16,
    pdl: bool = False,
    stages: int = 0,
    atomic_epilogue: bool = False,
    tile_bytes: int = 0,
    max_split: int = _MAX_SPLIT_K,
    row_dot: bool = False,
) -> GemvConfig:
    """The launch for these block sizes. Defaults: the row-generic kernel as the H100 sweeps
    chose it (H100 sweep, bf16, s = 0 / 0.5 / 0.9):
    * one row: 256-byte Wᵀ runs (BLOCK_N = 128 bf16), 16-row tiles (32-row tiles cost
      registers and occupancy: slower on 4 of 5 shapes), ~8 programs per SM (4 or 16: slower
      on 3 of 5), 256 channels per masking step (vs 128: 4096² s=0.9 12.3 -> 9.4 µs,
      28672x8192 s=0 222 -> 179 µs; within 2% elsewhere except 14336x4096 s=0.9, +18%);
    * several rows (tensor cores): BLOCK_N = 256 was the fastest tile on all five shapes.

    ``chunk_k`` is the split granularity and the masking step, except that a split of at most
    ``one_step_max`` channels is masked in one step (more costs registers, hence occupancy).
    ``scratch_group``: N-blocks per compaction scratch copy (H100 sweep: 4, 8 and 16
    within 1-4%; one copy per split 1.15-1.3x slower at s = 0.9, one per program up to 7%
    slower at s = 0). ``row_kernel``: one row through ``_row_gemv_kernel`` (``num_warps``,
    ``acc_tile``, ``epi_floats``: partial sums per thread per epilogue load, each load an L2
    round trip of the last-arriving program). ``tile_bytes``: at least this many bytes per weight
    tile (``sub_k`` grows when ``block_n`` is clipped to a narrow weight). ``stages``,
    ``atomic_epilogue``: see ``GemvConfig``; ``row_dot``: several rows through the one-row
    kernel on tensor cores even at ``MAX_FMA_ROWS`` or fewer; ``max_split``: most K-splits.
    """
    row_kernel = row_kernel and rows <= MAX_ROW_KERNEL_ROWS
    use_dot = rows > 1 and (not row_kernel or row_dot or rows > MAX_FMA_ROWS)
    if block_n is None:
        block_n = (512 if use_dot else 256) // elem_size
    block_n = max(16, min(block_n, _next_pow2(n)))
    sub_k = max(sub_k, _next_pow2(tile_bytes // (block_n * elem_size)), 16 if use_dot and row_kernel else 1)
    block_r = _rows_block(rows, use_dot)
    n_blocks = triton.cdiv(n, block_n)
    n_chunks = max(1, triton.cdiv(k, chunk_k))
    split = max(1, round(programs_per_sm * num_sms / n_blocks))
    split = min(split, n_chunks, max_split)
    if n_blocks > _COUNTER_CAPACITY:
        split = 1
    chunks_per_split = triton.cdiv(n_chunks, split)
    split = triton.cdiv(n_chunks, chunks_per_split)  # no empty splits
    split_len = chunks_per_split * chunk_k
    one_step = split_len <= one_step_max and (row_kernel or not use_dot)
    step = _next_pow2(split_len) if one_step else chunk_k
    if row_kernel and block_r > 1:  # at most 8192 [rows, channels] values per masking step
        step = min(step, max(chunk_k, 8192 // block_r))
    return GemvConfig(block_n, step, sub_k, block_r, use_dot, split, split_len, scratch_group=scratch_group,
                      row_kernel=row_kernel, num_warps=num_warps, acc_tile=acc_tile,
                      epi_floats=epi_floats, pdl=pdl, stages=stages if row_kernel else 0,
                      atomic_epilogue=atomic_epilogue and row_kernel and split > 1)


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small grid that still exercises split-K


def _ws_columns(config: GemvConfig, ns: Sequence[int]) -> int:
    """Split-K workspace row length: BLOCK_N x all members' N-blocks."""
    return sum(triton.cdiv(n, config.block_n) for n in ns) * config.block_n


def _sums_fit(config: GemvConfig, rows: int, ns: Sequence[int]) -> bool:
    """Whether the atomic epilogue's per-device sums hold this launch's rows x columns."""
    return rows * _ws_columns(config, ns) <= _SUM_CAPACITY


def _split_group(config: GemvConfig, epi_r: int) -> int:
    """Partial tiles the last-arriving split sums per load (each load is an L2 round trip)."""
    budget = 32 * config.epi_floats * config.num_warps if config.row_kernel else 4096
    return max(1, min(_next_pow2(config.split_k), budget // (epi_r * config.block_n)))


@functools.lru_cache(maxsize=16)
def _pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch needs sm_90+ and a Triton with grid dependency control."""
    return (gdc_wait is not None and not _INTERPRET and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


_counters: dict[torch.device, Tensor] = {}
_sums: dict[torch.device, Tensor] = {}
_SUM_CAPACITY = 1 << 18  # float32 columns of the atomic epilogue's workspace (1 MB per device)


def reserve(device: torch.device) -> None:
    """Allocate the persistent per-device state now (the lower pass calls this at compile
    time; a first call does it too, see ``_persistent_zeros``)."""
    if device.type == "cuda":
        _arrival_counters(device)
        _split_sums(device)


def _persistent_zeros(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Zeros that outlive every call, made on a thread of their own.

    During a cudagraph-trees warm-up (``mode="reduce-overhead"``) every allocation of the
    calling thread goes to the graph's memory pool, which then rejects tensors it does not
    track as outputs ("tensor(s) in the cudagraph pool not tracked as outputs"); another
    thread allocates from the ordinary pool. Done once per device.
    """
    if device.type != "cuda":
        return torch.zeros(n, dtype=dtype, device=device)
    made: list[Tensor | BaseException] = []

    def make() -> None:
        try:
            with torch.cuda.device(device):
                made.append(torch.zeros(n, dtype=dtype, device=device))
                torch.cuda.synchronize(device)  # zero before any stream of the caller reads it
        except BaseException as e:  # re-raised on the calling thread
            made.append(e)

    worker = threading.Thread(target=make, name="fxsparse-reserve")
    worker.start()
    worker.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def _arrival_counters(device: torch.device) -> Tensor:
    """Per-device split-K counters; zeroed once, then reset by the kernel itself."""
    buf = _counters.get(device)
    if buf is None:
        buf = _counters[device] = _persistent_zeros(_COUNTER_CAPACITY, torch.int32, device)
    return buf


_last_stream: dict[torch.device, tuple[int, torch.cuda.Stream]] = {}
_launch_lock = threading.Lock()


@contextlib.contextmanager
def _ordered_launch(device: torch.device):
    """Hold while launching on the device's shared counters / sums: the launch is ordered
    after the previous one that used them.

    Launches on one stream never overlap, but two streams (two models served side by side,
    from one thread or several) could run split-K epilogues on the same counters at once and
    mix their sums. When the stream changes, the current one waits for the other's work so far
    (on one stream this is an integer comparison); the lock keeps another thread's launch from
    slipping between that wait and this launch. A capture is not ordered (waiting on work
    outside it is not capturable), and a replay runs no host code: concurrent replays on
    several streams are not ordered.
    """
    with _launch_lock:
        if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            raw = torch._C._cuda_getCurrentRawStream(device.index)
            last = _last_stream.get(device)
            if last is None or last[0] != raw:
                cur = torch.cuda.current_stream(device)
                if last is not None:
                    cur.wait_stream(last[1])
                _last_stream[device] = (raw, cur)
        yield


def _split_sums(device: torch.device) -> Tensor:
    """Per-device float32 sums of the atomic split-K epilogue; zeroed once, then zeroed again
    column by column by the last split that reads them."""
    buf = _sums.get(device)
    if buf is None:
        buf = _sums[device] = _persistent_zeros(_SUM_CAPACITY, torch.float32, device)
    return buf


# -- public API ---------------------------------------------------------------------------------


def max_rows(n: int, k: int, dtype: torch.dtype, sparsity: float | None = None) -> int:
    """Most rows (batch x tokens) the kernel takes, for a layer of this expected activation
    sparsity (None: unknown, as at a call); above it the op runs mask + cuBLAS, and the lower
    pass leaves the mask of a graph whose every call is above it to Inductor (fused into x's
    producer, ``passes/lower.py``).

    Two rows (16-bit weights, not deterministic) take the one-row kernel's stream with [2, ...]
    masks. H200, bf16, independent masks per row (``bench/results/gemv_h200.md``, rows 2),
    speedup over cuBLAS on the five benchmark shapes: 0.80-0.97x at s = 0 (mask + cuBLAS:
    0.89-1.02x), 0.98-1.21x at s = 0.5 (union sparsity 0.25; mask + cuBLAS 0.91-1.02x), 1.49-3.51x
    at 0.9; the stream passes mask + cuBLAS between s = 0.25 and 0.5. Three rows ran 0.63-0.80x
    at s = 0 and lost up to s = 0.5 (union 0.12), four 0.62-0.80x, 8-16 rows on tensor cores
    0.46-0.73x (``bench/gemv.py --crossover``, ``bench/results/gemv_crossover_h200.md``). So a layer
    planned below ``TWO_ROW_MIN_SPARSITY`` keeps one row. 8-bit weights (``dtype`` int8 or fp8)
    follow the 16-bit rule: per kept channel a row reads half the bytes, and torchao's path
    for two rows reads them all (unmeasured).
    """
    if dtype.itemsize > 2 or torch.are_deterministic_algorithms_enabled():
        return 1  # float32 is unmeasured; deterministic launches sum partials in a fixed order
    if sparsity is not None and sparsity < TWO_ROW_MIN_SPARSITY:
        return 1
    return _STREAM_MAX_ROWS


def supports(x: Tensor, weight: Tensor, accumulate: bool = False, weight_scale: Tensor | None = None) -> bool:
    """Whether the fused kernel handles this call (else the op runs mask + cuBLAS); with
    ``accumulate`` x may also be a float32 sum (rounded to the weight's dtype in the kernel).
    With ``weight_scale`` the weight is 8-bit (``QUANT_DTYPES``) and x any of ``_DTYPES``."""
    if not x.is_cuda or weight.device != x.device or weight.dim() != 2:
        return False
    if weight_scale is not None:
        if not (weight.dtype in QUANT_DTYPES and x.dtype in _DTYPES and weight_scale.device == x.device
                and weight_scale.dtype == torch.float32 and weight_scale.shape == weight.shape[:1]):
            return False
    else:
        x_dtypes = (weight.dtype, torch.float32) if accumulate else (weight.dtype,)
        if weight.dtype not in _DTYPES or x.dtype not in x_dtypes:
            return False
    n, k = weight.shape
    if n == 0 or k == 0 or x.shape[-1] != k:
        return False
    rows = x.numel() // k
    if not 1 <= rows <= (1 if accumulate else max_rows(n, k, weight.dtype)):
        return False
    return weight.stride(0) == 1 and weight.stride(1) == n  # column-major: Wᵀ contiguous


def threshold_gemv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    threshold: float,
    center: Tensor | None = None,
    channel_scale: Tensor | None = None,
    center_bias: Tensor | None = None,
    *,
    config: GemvConfig | None = None,
    weight_scale: Tensor | None = None,
) -> Tensor:
    """``F.linear(where(|x - center| * scale >= threshold, x, center), weight, bias)``, fused.

    Any weight strides are correct; column-major ones are fast. ``config`` overrides the block
    sizes (tests and benchmarks only). With ``weight_scale`` (float32 [N]) ``weight`` is 8-bit
    (``QUANT_DTYPES``) and stands for ``weight.float() * weight_scale[:, None]``.
    """
    (out,) = threshold_gemv_group(x, [weight], [bias], threshold, center, channel_scale,
                                  [center_bias], config=config,
                                  weight_scales=None if weight_scale is None else [weight_scale])
    return out


def threshold_gemv_group(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    threshold: float,
    center: Tensor | None = None,
    channel_scale: Tensor | None = None,
    center_biases: Sequence[Tensor | None] | None = None,
    *,
    config: GemvConfig | None = None,
    act: str | None = None,
    x_mul: Tensor | None = None,
    accumulate: Tensor | None = None,
    zeros_next: int = 0,
    weight_scales: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> list[Tensor] | Tensor:
    """``threshold_gemv`` of 1-3 weights that share ``x`` and its mask, in one launch.

    Sibling projections (q/k/v, gate/up) then pay the kernel's fixed cost (launch, masking,
    split-K epilogue: 4.8-9.4 µs on the H200, docs/performance.md) once instead of once each, and the
    small ones (k/v) ride along with a large one. Biases must be all present or all absent, and
    so must center biases. With ``act`` the input is ``act(x) * x_mul`` (``x_mul`` optional;
    ``ACTIVATIONS``), which the one-row kernel computes as it loads ``x``.

    With ``accumulate`` (float32, [*x.shape[:-1], sum of N], members side by side; one row and
    the one-row kernel only, as ``fxsparse::threshold_linear_acc`` runs it) the outputs are added to it
    instead, and the call returns ``zeros_next`` float32 zeros written by the same launch.

    With ``weight_scales`` (one float32 [N_i] per weight, any stride) the weights are 8-bit
    (int8 or fp8 e4m3, ``QUANT_DTYPES``): the one-row kernel converts each tile to float32 and
    scales the partial sums. ``dtype`` is the layer's activation dtype, what a float32 ``x`` is
    rounded to: the weights' dtype for 16-bit weights (the default), else x's dtype by default.
    """
    if act is not None:
        torch._check(act in _ACT_CODE, lambda: f"threshold_gemv: unknown activation {act!r}")
        torch._check(x_mul is None or (x_mul.shape == x.shape and x_mul.dtype == x.dtype),
                     lambda: "threshold_gemv: x_mul must match x in shape and dtype")
    else:
        torch._check(x_mul is None, lambda: "threshold_gemv: x_mul without act")
    k = x.shape[-1]
    members = len(weights)
    torch._check(1 <= members <= MAX_MEMBERS,
                 lambda: f"threshold_gemv: 1-{MAX_MEMBERS} weights, got {members}")
    center_biases = list(center_biases) if center_biases is not None else [None] * members
    torch._check(len(biases) == members and len(center_biases) == members,
                 lambda: "threshold_gemv: one bias and one center_bias per weight")
    wdtype = weights[0].dtype
    quant = weight_scales is not None
    if quant:
        torch._check(wdtype in QUANT_DTYPES, lambda: f"threshold_gemv: weight_scales with {wdtype} weights; "
                     f"they are for {QUANT_DTYPES}")
        ldtype = x.dtype if dtype is None else dtype
        torch._check(len(weight_scales) == members, lambda: "threshold_gemv: one weight scale per weight")
        for w, sc in zip(weights, weight_scales, strict=True):
            torch._check(sc.dtype == torch.float32 and sc.shape == w.shape[:1] and sc.device == w.device,
                         lambda: "threshold_gemv: a weight scale must be float32 [N] on the weight's device")
    else:
        ldtype = wdtype if dtype is None else dtype
        torch._check(ldtype == wdtype, lambda: f"threshold_gemv: dtype {dtype} for {wdtype} weights")
    torch._check(ldtype in _DTYPES, lambda: f"threshold_gemv: unsupported activation dtype {ldtype}")
    x_ok = (x.dtype == ldtype or (accumulate is not None and x.dtype == torch.float32)) and (
        x_mul is None or x_mul.dtype == x.dtype)
    for w in weights:
        torch._check(w.dim() == 2 and w.shape[1] == k, lambda: "threshold_gemv: bad weight")
        torch._check(w.dtype == wdtype and x_ok, lambda: "threshold_gemv: weight and x dtypes differ")
    torch._check(wdtype in _DTYPES or quant, lambda: f"threshold_gemv: unsupported dtype {wdtype}")
    has_bias = biases[0] is not None
    torch._check(all((b is not None) == has_bias for b in biases),
                 lambda: "threshold_gemv: biases must be all present or all absent")
    x2 = x.reshape(-1, k)  # a view for any usual layout; a tiny copy otherwise
    rows = x2.shape[0]
    ns = [w.shape[0] for w in weights]
    if accumulate is not None:
        torch._check(accumulate.dtype == torch.float32 and accumulate.is_contiguous()
                     and accumulate.shape == (*x.shape[:-1], sum(ns)),
                     lambda: "threshold_gemv: accumulate must be a contiguous float32 [..., sum of N]")
        acc2 = accumulate.view(rows, sum(ns))
        offs = [sum(ns[:i]) for i in range(members)]
        outs = [acc2[:, o:o + n] for o, n in zip(offs, ns, strict=True)]
        shaped = _uninitialised(zeros_next, x.device)  # the kernel writes the zeros
    else:
        outs = [torch.empty((rows, n), dtype=ldtype, device=x.device) for n in ns]
        shaped = [o.reshape(*x.shape[:-1], n) for o, n in zip(outs, ns, strict=True)]
    if rows == 0 or sum(ns) == 0 or k == 0:
        if accumulate is not None:
            shaped.zero_()
        for o, b in zip(outs, biases, strict=True):
            if accumulate is None:
                o.zero_()
            if b is not None and rows and k == 0:
                o += b
        return shaped

    center_mode = 0
    if center is not None:
        center_mode = 1 if center.dim() == 0 else 2
        scales = list(weight_scales) if quant else [None] * members
        for w, cb, sc in zip(weights, center_biases, scales, strict=True):
            fresh_center_bias(w, center, cb, sc, ldtype)  # the weight may have changed in place since
        if any(cb is None for cb in center_biases):  # slow path: W @ c computed per call,
            # as the lowering folds it (a float32 copy of W here would double the call's bytes)
            center_biases = [center_bias_value(w, center, sc, ldtype) if cb is None else cb
                             for w, cb, sc in zip(weights, center_biases, scales, strict=True)]
    else:
        torch._check(all(cb is None for cb in center_biases),
                     lambda: "threshold_gemv: center_bias without a center")

    if config is None:
        pick = functools.partial(_pick_config, rows, sum(ns), k, weights[0].element_size(),
                                 _num_sms(x.device), accumulate=accumulate is not None)
        config = pick()
        if config.atomic_epilogue and accumulate is None and not _sums_fit(config, rows, ns):
            config = pick(deterministic=True)  # wider than the sums workspace: partials instead
    torch._check(accumulate is None or (config.row_kernel and rows == 1),
                 lambda: "threshold_gemv: accumulate needs one row and the one-row kernel")
    torch._check(not quant or config.row_kernel,
                 lambda: "threshold_gemv: 8-bit weights need the one-row kernel")
    torch._check(not config.row_kernel or _rows_block(rows, config.use_dot) == config.block_r,
                 lambda: f"threshold_gemv: config for {config.block_r} rows, x has {rows}")
    if act is not None and not config.row_kernel:  # only the one-row kernel has the prologue
        x2, act, x_mul = activation_reference(x, act, x_mul).reshape(-1, k), None, None
    xm2 = x_mul.reshape(-1, k) if x_mul is not None else x2
    ws_n = _ws_columns(config, ns)
    n_blocks = ws_n // config.block_n
    torch._check(
        config.split_k == 1 or n_blocks <= _COUNTER_CAPACITY,
        lambda: "threshold_gemv: too many N-blocks for split-K",
    )
    split_len = config.split_len
    n_scr = config.split_k * triton.cdiv(n_blocks, config.scratch_group)
    scr_rows = config.block_r if config.row_kernel else rows  # value rows per scratch copy
    scr = torch.empty((n_scr, 1 + scr_rows, split_len), dtype=torch.float32, device=x.device)
    shared = config.split_k > 1 and accumulate is None  # a split-K epilogue: the device's counters
    atomic_epi = config.atomic_epilogue and shared
    torch._check(not config.row_kernel or rows == 1
                 or (config.stages > 0 and (atomic_epi or config.split_k == 1)),
                 lambda: "threshold_gemv: several rows in the one-row kernel need its pipelined loop and "
                         "the atomic split-K epilogue")
    if atomic_epi:
        torch._check(_sums_fit(config, rows, ns),
                     lambda: "threshold_gemv: too many columns for the atomic epilogue")
        ws, cnt = _split_sums(x.device), _arrival_counters(x.device)
    elif shared:
        ws = torch.empty((config.split_k, rows, ws_n), dtype=torch.float32, device=x.device)
        cnt = _arrival_counters(x.device)
    else:
        ws = cnt = outs[0]
    epi_r = _next_pow2(rows)
    split_group = _split_group(config, epi_r)
    dummy = x2
    member_args = []
    for i in range(MAX_MEMBERS):
        j = min(i, members - 1)  # unused slots repeat the last member (never selected)
        w, b, cb = weights[j], biases[j], center_biases[j]
        member_args += [w, outs[j], b if b is not None else dummy, cb if cb is not None else dummy,
                        ns[j], w.stride(0), w.stride(1)]
    scale_args = [dummy] * MAX_MEMBERS + [0] * MAX_MEMBERS
    if quant:
        sel = [weight_scales[min(i, members - 1)] for i in range(MAX_MEMBERS)]
        scale_args = sel + [sc.stride(0) for sc in sel]
    grid = (n_blocks, config.split_k)
    with _ordered_launch(x.device) if shared else contextlib.nullcontext():
        if config.row_kernel:
            pdl = config.pdl and _pdl_ok(x.device)
            _row_gemv_kernel[grid](
                x2, xm2, *member_args, *scale_args,
                center if center is not None else dummy,
                channel_scale if channel_scale is not None else dummy,
                ws, cnt, scr, shaped if zeros_next else dummy, zeros_next,
                triton.cdiv(zeros_next, grid[0] * grid[1]),
                k, ws_n, x2.stride(1), xm2.stride(1), rows, x2.stride(0), xm2.stride(0), float(threshold),
                config.split_k, split_len,
                config.chunks_per_split, config.scratch_group,
                NUM_W=members,
                XDT=_TL_DTYPES[ldtype],
                QUANT=quant,
                BLOCK_R=config.block_r,
                USE_DOT=config.use_dot,
                DOT_FP32=x.dtype == torch.float32 or _INTERPRET or quant,
                CENTER_MODE=center_mode,
                HAS_SCALE=channel_scale is not None,
                HAS_BIAS=has_bias,
                HAS_CB=center_biases[0] is not None,
                BLOCK_N=config.block_n,
                CHUNK_K=config.chunk_k,
                SUB_K=config.sub_k,
                SPLIT_GROUP=split_group,
                ACC_TILE=config.acc_tile,
                PDL=pdl,
                ACT=_ACT_CODE[act] if act is not None else 0,
                GATED=x_mul is not None,
                ACCUM=accumulate is not None,
                ZERO=zeros_next > 0,
                STAGES=config.stages,
                ATOMIC_EPI=atomic_epi,
                num_warps=config.num_warps,
                launch_pdl=pdl,
            )
            return shaped
        _threshold_gemv_kernel[grid](
            x2,
            *member_args,
            center if center is not None else dummy,
            channel_scale if channel_scale is not None else dummy,
            ws,
            cnt,
            scr,
            rows,
            k,
            ws_n,
            x2.stride(0),
            x2.stride(1),
            float(threshold),
            config.split_k,
            split_len,
            config.chunks_per_split,
            config.scratch_group,
            NUM_W=members,
            CENTER_MODE=center_mode,
            HAS_SCALE=channel_scale is not None,
            HAS_BIAS=has_bias,
            HAS_CB=center_biases[0] is not None,
            BLOCK_R=config.block_r,
            EPI_R=epi_r,
            BLOCK_N=config.block_n,
            CHUNK_K=config.chunk_k,
            SUB_K=config.sub_k,
            USE_DOT=config.use_dot,
            DOT_FP32=x.dtype == torch.float32 or _INTERPRET,
            SPLIT_GROUP=split_group,
            ONE_STEP=config.chunks_per_split == 1,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        return shaped
