"""2:4 prune + compression straight into cuSPARSELt's layout, in one pass over ``x``.

``torch._cslt_sparse_mm(A_compressed, B)`` multiplies a 2:4-sparse, row-major, 16-bit ``A``
([M, K]) on the sparse tensor cores. Torch builds ``A_compressed`` with ``torch._cslt_compress``
from an already pruned dense tensor, reading and writing far more than the bytes that must move
(about 0.1 TB/s on an H100). This kernel reads ``x`` once and writes the compressed buffer once:
the byte floor of the step. The layout (below, by the constants) was decoded from
``torch._cslt_compress`` outputs on an H100 with cuSPARSELt 0.8 (``bench/probe/cslt_layout.py``)
and is checked byte for byte against them in ``tests/test_compress24.py``.

Pruning rule = ``prune24``'s: keep the 2 entries of each group of 4 with the largest
``|x - center|`` (float32; NaN ranks as +inf; ties: lower index wins). The stored values are
``x - center`` rounded to x's dtype, so ``F.linear(prune24(x, c), W) = sparse_mm(compressed, W.T)
+ W @ c``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["compress24", "compress24_reference", "compressed_numel", "decompress24_reference"]

# cuSPARSELt's compressed layout for bf16/fp16 [M, K]:
# * values: [M, K/2] row-major, the two kept entries of every group of 4 in column order;
# * metadata, right after the values: for every 64-row block (M padded up to a multiple of 64)
#   and, inside it, every 32-column k-tile, 256 bytes. A group's 4-bit code is i0 | i1 << 2
#   (i0 < i1 the kept positions in the group). Inside a tile, with row = 16*b + 8*h + r (h in
#   0..1, r in 0..7) and group g = 4*gh + gl of the tile's 8, the code sits in nibble
#   16*(8*b + r) + 4*gl + 2*gh + h (low nibble first); padding rows hold code 0b1110, as torch
#   writes them.
# The buffer has torch's shape, [M, ceil(numel / M)], with the data in its flat prefix
# (cuSPARSELt reads M off dim 0). A program handles 64 rows x BLOCK_K columns: it reads each
# group of 4 entries as one int64 word, ranks and selects on the raw 16-bit patterns with integer
# arithmetic (all in one thread), and packs each row pair (r, r + 8) of a k-tile into 8 bytes of
# metadata.
_ROW_BLOCK = 64  # metadata rows per block
_K_TILE = 32  # metadata columns per tile
_PAD_CODE = 0b1110  # what torch._cslt_compress writes for padding rows


def compressed_numel(m: int, k: int) -> int:
    """Elements (of x's 16-bit dtype) in the compressed buffer of an [m, k] matrix."""
    m_pad = -(-m // _ROW_BLOCK) * _ROW_BLOCK
    return m * k // 2 + m_pad * k // 16


def _check(x: Tensor) -> None:
    torch._check(x.dim() == 2, lambda: f"compress24: x must be 2-D, got {tuple(x.shape)}")
    torch._check(
        x.dtype in (torch.bfloat16, torch.float16),
        lambda: f"compress24: x must be bfloat16 or float16, got {x.dtype}",
    )
    torch._check(
        x.shape[1] % _K_TILE == 0,
        lambda: f"compress24: the last dim must be a multiple of {_K_TILE}, got {x.shape[1]}",
    )


def _empty(m: int, k: int, like: Tensor) -> Tensor:
    """The buffer torch._cslt_compress returns: [m, ceil(numel / m)], the data in its flat prefix
    (cuSPARSELt reads the sparse operand's row count off dim 0)."""
    n = compressed_numel(m, k)
    return torch.empty((m, -(-n // m) if m else 0), dtype=like.dtype, device=like.device)


# -- reference (plain torch): the CPU implementation and the tests' oracle -------------------


def compress24_reference(x: Tensor, center: Tensor | float | None = None) -> Tensor:
    """The compressed buffer of ``prune24(x, center) - center``, computed with plain torch."""
    from .prune24 import keep24_reference  # kernels may import kernels

    _check(x)
    m, k = x.shape
    fill = torch.zeros((), dtype=x.dtype, device=x.device)
    if center is not None:
        fill = torch.as_tensor(center, device=x.device).to(x.dtype)
    keep = keep24_reference(x, fill).reshape(m, k // 4, 4)
    diff = (x.float() - fill.float()).to(x.dtype).reshape(m, k // 4, 4)
    idx = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :2]
    idx = idx.sort(dim=-1).values  # i0 < i1
    values = diff.gather(-1, idx).reshape(m, k // 2)
    code = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int64)  # [m, k/4]

    m_pad = -(-m // _ROW_BLOCK) * _ROW_BLOCK
    codes = torch.full((m_pad, k // 4), _PAD_CODE, dtype=torch.int64, device=x.device)
    codes[:m] = code
    # (row block, b, h, r, k-tile, gh, gl) -> (row block, k-tile, b, r, gl, gh, h)
    t = codes.reshape(m_pad // 64, 4, 2, 8, k // 32, 2, 4).permute(0, 4, 1, 3, 6, 5, 2)
    nib = t.reshape(-1, 2)
    meta = (nib[:, 0] | (nib[:, 1] << 4)).to(torch.uint8)
    out = _empty(m, k, x)
    flat = out.view(-1)
    flat[: m * k // 2] = values.reshape(-1)
    flat[m * k // 2 : compressed_numel(m, k)] = meta.view(x.dtype)
    return out


def decompress24_reference(buf: Tensor, m: int, k: int) -> Tensor:
    """Dense [m, k] matrix (zeros at dropped entries) from a compressed buffer: inverts the layout."""
    buf = buf.reshape(-1)[: compressed_numel(m, k)]
    values = buf[: m * k // 2].reshape(m, k // 4, 2)
    meta = buf[m * k // 2 :].view(torch.uint8).to(torch.int64)
    nib = torch.stack([meta & 15, meta >> 4], dim=-1)
    m_pad = -(-m // _ROW_BLOCK) * _ROW_BLOCK
    t = nib.reshape(m_pad // 64, k // 32, 4, 8, 4, 2, 2)  # (blk, kt, b, r, gl, gh, h)
    codes = t.permute(0, 2, 6, 3, 1, 5, 4).reshape(m_pad, k // 4)[:m]
    idx = torch.stack([codes & 3, codes >> 2], dim=-1)
    dense = torch.zeros(m, k // 4, 4, dtype=buf.dtype, device=buf.device)
    dense.scatter_(-1, idx, values)
    return dense.reshape(m, k)


# -- Triton kernel ------------------------------------------------------------------------------


@triton.jit
def _bits_to_f32(e, IS_BF16: tl.constexpr):
    """float32 value of 16-bit float bit patterns held in int32 (exact)."""
    if IS_BF16:
        return (e << 16).to(tl.float32, bitcast=True)
    else:
        return e.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f32_to_bits(v, IS_BF16: tl.constexpr):
    """16-bit float bit patterns (int32, 0..65535) of float32 ``v``, rounded to nearest even."""
    if IS_BF16:  # by hand: the interpreter truncates bf16 casts
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.int32)
    else:
        return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _compress24_kernel(
    x_ptr,  # [M, K] as int64 words (a group of 4 16-bit entries per word), row stride stride_xw
    center_ptr,  # [K] or [1] float32 (read when HAS_CENTER)
    val_ptr,  # compressed buffer as int32: values [M, K/2] (2 per word) first
    meta_ptr,  # the same buffer as int32: metadata from word meta_base on
    M,  # rows of x
    M_OUT,  # rows of the compressed matrix (>= M; rows past M are zeros)
    K,
    stride_xw,
    meta_base,  # M_OUT * K / 4: the first metadata word (int32 units)
    IS_BF16: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    CENTER_PER_CHANNEL: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of 32 (k-tiles per program = BLOCK_K / 32)
):
    # Integer arithmetic on the raw 16-bit patterns: a whole group of 4 is one int64 word in
    # one thread, so ranking, selection and packing need no data exchange between threads.
    G: tl.constexpr = BLOCK_K // 4  # groups per row in this program
    T: tl.constexpr = BLOCK_K // 32  # k-tiles in this program
    INF: tl.constexpr = 0x7F80 if IS_BF16 else 0x7C00  # |x| bits of +inf; NaN bits are above
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * 64 + tl.arange(0, 64)
    grp = pid_k * G + tl.arange(0, G)
    r_ok = rows < M
    ok = r_ok[:, None] & (grp < K // 4)[None, :]
    w = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xw + grp[None, :], mask=ok, other=0)
    e0 = (w & 0xFFFF).to(tl.int32)
    e1 = ((w >> 16) & 0xFFFF).to(tl.int32)
    e2 = ((w >> 32) & 0xFFFF).to(tl.int32)
    e3 = ((w >> 48) & 0xFFFF).to(tl.int32)
    if HAS_CENTER:  # rank |x - c| in float32, store x - c rounded to x's dtype
        if CENTER_PER_CHANNEL:
            cp = center_ptr + grp * 4
            gk = grp < K // 4
            f0 = _bits_to_f32(e0, IS_BF16) - tl.load(cp, mask=gk, other=0.0)[None, :]
            f1 = _bits_to_f32(e1, IS_BF16) - tl.load(cp + 1, mask=gk, other=0.0)[None, :]
            f2 = _bits_to_f32(e2, IS_BF16) - tl.load(cp + 2, mask=gk, other=0.0)[None, :]
            f3 = _bits_to_f32(e3, IS_BF16) - tl.load(cp + 3, mask=gk, other=0.0)[None, :]
        else:
            c = tl.load(center_ptr)
            f0 = _bits_to_f32(e0, IS_BF16) - c
            f1 = _bits_to_f32(e1, IS_BF16) - c
            f2 = _bits_to_f32(e2, IS_BF16) - c
            f3 = _bits_to_f32(e3, IS_BF16) - c
        m0 = tl.abs(f0)
        m1 = tl.abs(f1)
        m2 = tl.abs(f2)
        m3 = tl.abs(f3)
        m0 = tl.where(m0 != m0, float("inf"), m0)  # NaN ranks as +inf
        m1 = tl.where(m1 != m1, float("inf"), m1)
        m2 = tl.where(m2 != m2, float("inf"), m2)
        m3 = tl.where(m3 != m3, float("inf"), m3)
        e0 = _f32_to_bits(f0, IS_BF16)
        e1 = _f32_to_bits(f1, IS_BF16)
        e2 = _f32_to_bits(f2, IS_BF16)
        e3 = _f32_to_bits(f3, IS_BF16)
    else:  # |x| as an integer: the bit patterns of non-negative floats order like the values
        m0 = tl.minimum(e0 & 0x7FFF, INF)  # NaN ranks as +inf
        m1 = tl.minimum(e1 & 0x7FFF, INF)
        m2 = tl.minimum(e2 & 0x7FFF, INF)
        m3 = tl.minimum(e3 & 0x7FFF, INF)
    # padding rows rank as all-equal (-> code 0b0100) and store zeros
    pad = ~r_ok[:, None]
    # i beats j (i < j) when m_i >= m_j (ties: the lower index wins); the top 2 beat >= 2 others
    b01 = (m0 >= m1).to(tl.int32)
    b02 = (m0 >= m2).to(tl.int32)
    b03 = (m0 >= m3).to(tl.int32)
    b12 = (m1 >= m2).to(tl.int32)
    b13 = (m1 >= m3).to(tl.int32)
    b23 = (m2 >= m3).to(tl.int32)
    k0 = (b01 + b02 + b03 >= 2) | pad
    k1 = (b12 + b13 - b01 >= 1) | pad
    k2 = (b23 - b02 - b12 >= 0) & ~pad
    # exactly two of k0..k3 hold: i0 is the first, i1 the second
    i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
    i1 = tl.where(k2 & (i0 < 2), 2, tl.where(k1 & (i0 == 0), 1, 3))
    first = tl.where(k0, e0, tl.where(k1, e1, e2))
    second = tl.where(i1 == 1, e1, tl.where(i1 == 2, e2, e3))
    packed = tl.where(pad, 0, first | (second << 16))  # [64, G]: the group's 2 values

    tl.store(
        val_ptr + rows[:, None].to(tl.int64) * (K // 4) + grp[None, :],
        packed,
        mask=(rows < M_OUT)[:, None] & (grp < K // 4)[None, :],
    )

    # metadata: 8 bytes per (row pair r, r + 8) and k-tile, as two int32 words (lo, hi)
    code = (i0 | (i1 << 2)).to(tl.uint32)
    code = tl.where((rows < M_OUT)[:, None], code, 0b1110)  # past the matrix, as torch writes it
    gi = tl.arange(0, G) % 8
    byte = 2 * (gi % 4) + gi // 4  # byte of the row pair's 8 in which group gi's code sits
    half = (tl.arange(0, 64) // 8) % 2  # row r (low nibble) or r + 8 (high nibble)
    shifted = code << (8 * (byte % 4)[None, :] + 4 * half[:, None]).to(tl.uint32)
    lo = tl.where((byte < 4)[None, :], shifted, 0)
    hi = tl.where((byte >= 4)[None, :], shifted, 0)
    lo = tl.sum(tl.reshape(tl.sum(tl.reshape(lo, (64, T, 8)), axis=2), (4, 2, 8, T)), axis=1)
    hi = tl.sum(tl.reshape(tl.sum(tl.reshape(hi, (64, T, 8)), axis=2), (4, 2, 8, T)), axis=1)
    words = tl.join(lo, hi).to(tl.int32, bitcast=True)  # [4, 8, T, 2]
    n_kt = K // 32
    kt = pid_k * T + tl.arange(0, T)
    b = tl.arange(0, 4)
    r = tl.arange(0, 8)
    idx = ((pid_m * n_kt + kt[None, None, :]).to(tl.int64) * 32 + 8 * b[:, None, None] + r[None, :, None]) * 2
    idx = idx[:, :, :, None] + tl.arange(0, 2)[None, None, None, :]
    tl.store(meta_ptr + meta_base + idx, words, mask=(kt < n_kt)[None, None, :, None])


def compress24(
    x: Tensor,
    center: Tensor | float | None = None,
    rows: int | None = None,
    block_k: int = 128,
    num_warps: int = 8,
) -> Tensor:
    """``torch._cslt_compress(prune24(x, center) - center)`` in one pass (Triton).

    ``x``: [M, K] bf16/fp16 with unit column stride, K a multiple of 32. ``rows`` (>= M) pads
    the compressed matrix with zero rows without copying ``x`` (cuSPARSELt wants M aligned).
    CUDA, or CPU under ``TRITON_INTERPRET=1``; :func:`compress24_reference` is the plain-torch
    equivalent.
    """
    _check(x)
    m_in, k = x.shape
    m = m_in if rows is None else rows
    torch._check(m >= m_in, lambda: f"compress24: rows={rows} is below x's {m_in} rows")
    # the kernel reads a group of 4 entries as one 8-byte word
    if x.stride(1) != 1 or x.stride(0) % 4 or x.data_ptr() % 8:
        x = x.contiguous()
    if center is not None:
        # rounded to x's dtype first (the dropped value is the center in x's dtype), then float32
        center = torch.as_tensor(center, device=x.device).to(x.dtype).float().reshape(-1).contiguous()
        torch._check(center.numel() in (1, k), lambda: f"compress24: center must be a scalar or ({k},)")
    buf = _empty(m, k, x)
    if m == 0:
        return buf
    block_k = min(block_k, triton.next_power_of_2(k))
    while k % block_k:  # a power-of-two multiple of 32 that divides K
        block_k //= 2
    grid = (triton.cdiv(m, _ROW_BLOCK), k // block_k)
    words = buf.view(-1)[: compressed_numel(m, k)].view(torch.int32)
    _compress24_kernel[grid](
        x.view(torch.int64) if m_in else x,
        center if center is not None else words,
        words,
        words,
        m_in,
        m,
        k,
        x.stride(0) // 4,
        m * k // 4,
        IS_BF16=x.dtype == torch.bfloat16,
        HAS_CENTER=center is not None,
        CENTER_PER_CHANNEL=center is not None and center.numel() == k and k > 1,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return buf
