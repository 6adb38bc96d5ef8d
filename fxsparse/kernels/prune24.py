"""2:4 activation pruning: the ``fxsparse::prune24`` op and the kernels of 2:4 training.

Inference semantics (``prune24``; the one definition every implementation must match)::

    groups of 4 consecutive channels along the last dim (the last dim must be a multiple of 4)
    d    = |x - center|  in float32 (center 0 when None; a scalar or one value per channel)
    NaN in d ranks as +inf (a tie with +-inf), so a NaN propagates as in the dense layer,
    unless its group holds 3 or 4 NaN/inf entries: then only the 2 lowest-index are kept
    keep the 2 entries of each group with the largest d; ties: the lower index wins
    out  = where(keep, x, center), contiguous, of x's shape (every implementation)

"Lower index wins" makes the result a pure function of the values, so Triton and the reference
agree bit for bit. Training (seed 004, ``fxsparse/training.py``) prunes ``ReLU(y)^2`` with
``naive``, ``mvue`` or ``soft_threshold`` (see ``METHODS`` below), and along tokens for the
backward (``prune24_tokens_t``). Every kernel has a plain-torch reference beside it, which is also
the CPU implementation; the Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .threshold_linear import _as

__all__ = [
    "METHODS",
    "prune24",
    "prune24_reference",
    "keep24_reference",
    "prune24_triton",
    "prune24_tokens_t",
    "prune24_tokens_t_reference",
    "sparsify24",
    "sparsify24_reference",
    "is_24",
    "relu2_grad24",
    "relu2_grad24_reference",
]

# Training's 2:4 methods, all per group of 4 (Haziza et al. 2025, arXiv:2503.16672):
# * naive: keep the top 2 by |v| (the inference rule with center 0); dropped entries are 0.
# * mvue: keep 2 entries at random, entry j with inclusion probability p_j, and output v_j / p_j
#   (Horvitz-Thompson), so E[out] = v exactly. The p_j minimising the variance
#   sum v_j^2 (1/p_j - 1) under sum p = 2, p <= 1 are p_j = 2|v_j| / S (S = sum |v|) unless
#   2 max|v| >= S; then the largest gets p = 1 and the others |v_j| / (S - max|v|). Systematic
#   sampling draws two entries with exactly these probabilities: one u ~ U[0, 1) per group picks
#   the entries whose interval [C_j, C_j + p_j) (C the running sum of p) holds u or u + 1. Groups
#   with at most 2 non-zeros are kept exactly (p = 1 or 0), so they carry no noise.
# * soft_threshold: t = the 3rd largest |v| of the group; the top 2 become sign(v) * (|v| - t)
#   (S-STE, Hu et al. 2024, arXiv:2409.09099); the caller multiplies by a per-layer scale
#   dot(v, s) / dot(s, s) computed once (training.py).
# The feature-wise backward applies the top-2 rule along tokens of a transposed matrix:
# prune24_tokens_t reads rows in a fixed token order (the permutation), writes the transposed
# result, and leaves whole features zero when the caller keeps them dense.
# The kernels are jitted lazily, so TRITON_INTERPRET is read at a kernel's first launch.
METHODS = ("naive", "mvue", "soft_threshold")
_METHOD_ID = {m: i for i, m in enumerate(METHODS)}


# ------------------------------------------------------------------------------------------
# References (plain torch): the CPU implementations and the tests' oracles
# ------------------------------------------------------------------------------------------


def _rank4(d: Tensor) -> Tensor:
    """Rank of each entry in its group of 4 (last dim of ``d``): 0 = largest, ties by index.

    A stable descending sort keeps tied entries in index order, which is exactly "the lower
    index wins" (and ~4x faster on CPU than the 4x4 comparison the kernels use). ``d`` must
    hold no NaN (callers map NaN to +inf).
    """
    idx = torch.sort(d, dim=-1, descending=True, stable=True).indices
    order = torch.arange(4, device=d.device).expand_as(idx)
    return torch.empty_like(idx).scatter_(-1, idx, order)


def _magnitude(v: Tensor) -> Tensor:
    d = _as(v, torch.float32).abs()
    return torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)


def prune24_reference(x: Tensor, center: Tensor | float | None = None) -> Tensor:
    """Keep the 2 entries of each group of 4 farthest from ``center``; set the others to it."""
    c = x.shape[-1]
    torch._check(c % 4 == 0, lambda: f"prune24: last dim must be a multiple of 4, got {c}")
    x = x.contiguous()  # torch.where would keep x's strides; the kernel writes row-major
    if center is None:
        fill = torch.zeros((), dtype=x.dtype, device=x.device)
    else:
        fill = torch.as_tensor(center, device=x.device).to(x.dtype)
    return torch.where(keep24_reference(x, fill), x, fill)


def keep24_reference(x: Tensor, center: Tensor | float | None = None) -> Tensor:
    """Boolean mask of the entries :func:`prune24_reference` keeps."""
    c = x.shape[-1]
    # no ``.float()`` / ``.to()`` that may return an input itself: ops call this in autograd setup
    d = _as(x, torch.float32)
    if center is not None:
        ct = center if isinstance(center, Tensor) else torch.as_tensor(center, device=x.device)
        d = d - _as(_as(ct, x.dtype), torch.float32)
    d = _magnitude(d)
    return _rank4(d.reshape(*x.shape[:-1], c // 4, 4)).reshape(x.shape) < 2


def is_24(x: Tensor, dim: int = -1) -> bool:
    """True when every group of 4 along ``dim`` holds at most 2 non-zeros."""
    x = x.movedim(dim, -1)
    nz = (x != 0).reshape(*x.shape[:-1], x.shape[-1] // 4, 4).sum(-1)
    return bool((nz <= 2).all())


def sparsify24_reference(
    v: Tensor, method: str, u: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """2:4 along the last dim of ``v`` by ``method`` (see the module docstring), unscaled.

    ``u`` (shape ``[..., C/4]``, uniform in [0, 1)) fixes the MVUE draw; drawn when None.
    """
    torch._check(method in METHODS, lambda: f"unknown 2:4 method {method!r}; use one of {METHODS}")
    c = v.shape[-1]
    torch._check(c % 4 == 0, lambda: f"sparsify24: last dim must be a multiple of 4, got {c}")
    g = v.to(torch.promote_types(v.dtype, torch.float32)).reshape(*v.shape[:-1], c // 4, 4)
    a = g.abs()
    if method != "mvue":
        rank = _rank4(a)
    if method == "naive":
        out = torch.where(rank < 2, g, torch.zeros_like(g))
    elif method == "soft_threshold":
        t = torch.where(rank == 2, a, torch.zeros_like(a)).sum(-1, keepdim=True)
        shrunk = torch.sign(g) * (a - t).clamp_min(0)
        out = torch.where(rank < 2, shrunk, torch.zeros_like(g))
    else:
        if u is None:
            u = torch.rand(g.shape[:-1], device=v.device, generator=generator)
        s = a.sum(-1, keepdim=True)
        amax = a.amax(-1, keepdim=True)
        capped = 2 * amax >= s
        # p = a / denom: denom = S/2 normally, S - max|v| when the largest is capped at 1
        denom = torch.where(capped, s - amax, 0.5 * s)
        p = torch.where(denom > 0, a / torch.where(denom > 0, denom, 1.0), 0.0)
        first = torch.zeros_like(a, dtype=torch.bool)  # rank 0: argmax returns the first max
        first.scatter_(-1, a.argmax(-1, keepdim=True), True)
        p = torch.where(capped & first, 1.0, p)
        cum = torch.cumsum(p, -1) - p
        uu = u.float().unsqueeze(-1)
        keep = ((cum <= uu) & (uu < cum + p)) | ((cum <= uu + 1) & (uu + 1 < cum + p))
        out = torch.where(keep, g / torch.where(p > 0, p, 1.0), torch.zeros_like(g))
    return out.reshape(v.shape).to(v.dtype)


def prune24_tokens_t_reference(
    y: Tensor, perm: Tensor | None = None, dense_features: Tensor | None = None
) -> Tensor:
    """``[C, T]``: top-2 of every 4 consecutive tokens (in ``perm`` order) of ``y`` ``[T, C]``.

    Features flagged in ``dense_features`` (bool ``[C]``) come out as zero rows: the caller
    computes them densely.
    """
    yp = y if perm is None else y.index_select(0, perm)
    out = prune24_reference(yp.t())
    if dense_features is not None:
        out = torch.where(dense_features.view(-1, 1), torch.zeros_like(out), out)
    return out


# ------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------
#
# All three kernels rank the 4 entries of a group with a 4x4 comparison (no sort), the same
# rule as ``_rank4``: entry k beats entry j when d_k > d_j, or d_k == d_j and k < j.


def _prune24_rows_kernel(
    x_ptr,  # [R, C] contiguous
    center_ptr,  # [C] (per channel) or [1] (scalar); unused without a center
    out_ptr,  # [R, C]
    R,
    C,
    HAS_CENTER: tl.constexpr,
    CENTER_PER_CHANNEL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # -- tile of rows x channels (BLOCK_C a multiple of 4: a group is all in or all out) --
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_CENTER:
        if CENTER_PER_CHANNEL:
            cen = tl.load(center_ptr + cols, mask=cols < C, other=0.0).to(x.dtype)[None, :]
        else:
            cen = tl.load(center_ptr).to(x.dtype)
    else:
        cen = tl.zeros([1, 1], dtype=x.dtype)
    # -- distance in float32, NaN ranked as +inf --
    d = tl.abs(x.to(tl.float32) - cen.to(tl.float32))
    d = tl.where(d != d, float("inf"), d)
    # -- rank within each group of 4 --
    d3 = tl.reshape(d, (BLOCK_R, BLOCK_C // 4, 4))
    a = d3[:, :, :, None]
    b = d3[:, :, None, :]
    j = tl.arange(0, 4)[:, None]
    k = tl.arange(0, 4)[None, :]
    rank = tl.sum(((b > a) | ((b == a) & (k < j))).to(tl.int32), axis=3)
    keep = tl.reshape(rank < 2, (BLOCK_R, BLOCK_C))
    # -- write --
    out = tl.where(keep, x, cen)
    tl.store(out_ptr + offs, out, mask=mask)


def _sparsify24_rows_kernel(
    y_ptr,  # [R, C] pre-activation when RELU2, else the values to prune
    out_ptr,  # [R, C] pruned values (unscaled)
    count_ptr,  # [C] int32 non-zeros per feature (accumulated), when COUNT
    seed,
    R,
    C,
    METHOD: tl.constexpr,  # 0 naive, 1 mvue, 2 soft_threshold
    RELU2: tl.constexpr,
    COUNT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    G: tl.constexpr = BLOCK_C // 4
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # -- fused activation: ReLU(y)^2 --
    if RELU2:
        v = tl.maximum(v, 0.0)
        v = v * v
    # -- rank within each group of 4 by |v| --
    v3 = tl.reshape(v, (BLOCK_R, G, 4))
    a3 = tl.abs(v3)
    a = a3[:, :, :, None]
    b = a3[:, :, None, :]
    j = tl.arange(0, 4)[:, None]
    k = tl.arange(0, 4)[None, :]
    rank = tl.sum(((b > a) | ((b == a) & (k < j))).to(tl.int32), axis=3)
    if METHOD == 0:
        out3 = tl.where(rank < 2, v3, 0.0)
    elif METHOD == 2:
        t = tl.sum(tl.where(rank == 2, a3, 0.0), axis=2)[:, :, None]
        shrunk = tl.maximum(a3 - t, 0.0)
        shrunk = tl.where(v3 < 0, -shrunk, shrunk)
        out3 = tl.where(rank < 2, shrunk, 0.0)
    else:
        # -- MVUE: inclusion probabilities, then systematic sampling with one u per group --
        s = tl.sum(a3, axis=2)[:, :, None]
        amax = tl.max(a3, axis=2)[:, :, None]
        capped = 2 * amax >= s
        # p = a / denom: denom = S/2 normally, S - max|v| when the largest is capped at 1
        denom = tl.where(capped, s - amax, 0.5 * s)
        p = tl.where(denom > 0, a3 / tl.where(denom > 0, denom, 1.0), 0.0)
        p = tl.where(capped & (rank == 0), 1.0, p)
        before = (k < j).to(tl.float32)  # [4, 4]: k precedes j
        cum = tl.sum(p[:, :, None, :] * before, axis=3)
        grp = rows[:, None] * (C // 4) + (tl.program_id(1) * G + tl.arange(0, G))[None, :]
        u = tl.rand(seed, grp)[:, :, None]
        keep = ((cum <= u) & (u < cum + p)) | ((cum <= u + 1) & (u + 1 < cum + p))
        out3 = tl.where(keep, v3 / tl.where(p > 0, p, 1.0), 0.0)
    out = tl.reshape(out3, (BLOCK_R, BLOCK_C))
    out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=mask)
    # -- per-feature non-zero counts (the backward's 95/5 split) --
    if COUNT:
        nz = tl.sum(((out != 0) & mask).to(tl.int32), axis=0)
        tl.atomic_add(count_ptr + cols, nz, mask=cols < C)


def _prune24_tokens_t_kernel(
    y_ptr,  # [T, C] contiguous
    perm_ptr,  # [T] int64 token order (when PERMUTE)
    dense_ptr,  # [C] int8, 1 = feature kept dense (when HAS_DENSE)
    out_ptr,  # [C, T]
    T,
    C,
    PERMUTE: tl.constexpr,
    HAS_DENSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # -- gather BLOCK_T tokens (whole groups of 4) x BLOCK_C features --
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask = t < T
    if PERMUTE:
        src = tl.load(perm_ptr + t, mask=tmask, other=0)
    else:
        src = t
    mask = tmask[:, None] & (cols[None, :] < C)
    y = tl.load(y_ptr + src[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0)
    # -- transpose to [features, tokens] and rank each group of 4 tokens --
    yt = tl.trans(y)
    d = tl.abs(yt.to(tl.float32))
    d = tl.where(d != d, float("inf"), d)
    d3 = tl.reshape(d, (BLOCK_C, BLOCK_T // 4, 4))
    a = d3[:, :, :, None]
    b = d3[:, :, None, :]
    j = tl.arange(0, 4)[:, None]
    k = tl.arange(0, 4)[None, :]
    rank = tl.sum(((b > a) | ((b == a) & (k < j))).to(tl.int32), axis=3)
    keep = tl.reshape(rank < 2, (BLOCK_C, BLOCK_T))
    if HAS_DENSE:
        dense = tl.load(dense_ptr + cols, mask=cols < C, other=0)
        keep = keep & (dense == 0)[:, None]
    out = tl.where(keep, yt, 0.0)
    # -- write [C, T] --
    omask = (cols[:, None] < C) & tmask[None, :]
    tl.store(out_ptr + cols[:, None].to(tl.int64) * T + t[None, :], out, mask=omask)


_JITTED: dict = {}


def _jit(fn):
    """``triton.jit(fn)``, made on first launch so ``TRITON_INTERPRET`` is read then."""
    key = (fn.__name__, os.environ.get("TRITON_INTERPRET", "0") == "1")
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _want_triton(x: Tensor, use_triton: bool | None) -> bool:
    """Triton on CUDA by default; on CPU only when asked (and then only in the interpreter)."""
    if use_triton is None:
        return x.is_cuda
    if use_triton and not x.is_cuda and not _interpreting():
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1")
    return use_triton


def _as_rows(x: Tensor) -> Tensor:
    return x.contiguous().view(-1, x.shape[-1])


# Tiles: 16 rows x 128 channels keep the [16, 32, 4, 4] rank tensor at 8K elements per
# program (64 registers a thread at 4 warps). Not tuned on hardware yet.
_BLOCK_R, _BLOCK_C = 16, 128


def prune24_triton(x: Tensor, center: Tensor | float | None = None) -> Tensor:
    """Triton implementation of :func:`prune24_reference` (CUDA, or CPU when interpreting)."""
    # -- check --
    c = x.shape[-1]
    torch._check(c % 4 == 0, lambda: f"prune24: last dim must be a multiple of 4, got {c}")
    if center is not None:
        # rounded to x's dtype here: the interpreter's fp32->bf16 cast truncates, torch's rounds
        center = torch.as_tensor(center, device=x.device).to(x.dtype).reshape(-1)
        torch._check(
            center.numel() in (1, c),
            lambda: f"prune24: center must be a scalar or ({c},), got {center.numel()} values",
        )
    x2 = _as_rows(x)
    # -- allocate --
    out = torch.empty_like(x2)
    if x2.numel() == 0:
        return out.view(x.shape)
    # -- launch --
    r = x2.shape[0]
    block_c = min(_BLOCK_C, triton.next_power_of_2(c))
    grid = (triton.cdiv(r, _BLOCK_R), triton.cdiv(c, block_c))
    _jit(_prune24_rows_kernel)[grid](
        x2,
        center.contiguous() if center is not None else x2,
        out,
        r,
        c,
        HAS_CENTER=center is not None,
        CENTER_PER_CHANNEL=center is not None and center.numel() == c and c > 1,
        BLOCK_R=_BLOCK_R,
        BLOCK_C=block_c,
    )
    return out.view(x.shape)


def sparsify24(
    y: Tensor,
    method: str,
    relu2: bool = False,
    count: bool = False,
    seed: int | None = None,
    use_triton: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """2:4 along the last dim of ``y`` (or of ``ReLU(y)^2`` when ``relu2``), with counts.

    Returns ``(pruned, counts)``: ``counts`` (int32 ``[C]``) is the number of non-zeros per
    feature when ``count``. ``use_triton``: None picks Triton on CUDA and the reference on
    CPU; True on CPU needs ``TRITON_INTERPRET=1``.
    """
    torch._check(method in METHODS, lambda: f"unknown 2:4 method {method!r}; use one of {METHODS}")
    c = y.shape[-1]
    y2 = _as_rows(y)
    if not _want_triton(y, use_triton):
        dt = torch.promote_types(y.dtype, torch.float32)  # fp32 like the kernel; fp64 kept
        v = torch.relu(y2.to(dt)).square() if relu2 else y2.to(dt)
        gen = None
        if seed is not None and method == "mvue":
            gen = torch.Generator(device=y.device).manual_seed(seed)
        out = sparsify24_reference(v, method, generator=gen).to(y.dtype)
        counts = (out != 0).sum(0, dtype=torch.int32) if count else None
        return out.view(y.shape), counts
    torch._check(c % 4 == 0, lambda: f"sparsify24: last dim must be a multiple of 4, got {c}")
    out = torch.empty_like(y2)
    counts = torch.zeros(c, dtype=torch.int32, device=y.device) if count else None
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # host RNG: no device sync
    r = y2.shape[0]
    block_c = min(_BLOCK_C, triton.next_power_of_2(c))
    grid = (triton.cdiv(r, _BLOCK_R), triton.cdiv(c, block_c))
    if r > 0:
        _jit(_sparsify24_rows_kernel)[grid](
            y2,
            out,
            counts if counts is not None else out,
            seed,
            r,
            c,
            METHOD=_METHOD_ID[method],
            RELU2=relu2,
            COUNT=count,
            BLOCK_R=_BLOCK_R,
            BLOCK_C=block_c,
        )
    return out.view(y.shape), counts


_BLOCK_T, _BLOCK_TC = 64, 64


def prune24_tokens_t(
    y: Tensor,
    perm: Tensor | None = None,
    dense_features: Tensor | None = None,
    use_triton: bool | None = None,
) -> Tensor:
    """Triton implementation of :func:`prune24_tokens_t_reference` (reference on CPU)."""
    t, c = y.shape
    torch._check(t % 4 == 0, lambda: f"prune24_tokens_t: token count must be a multiple of 4, got {t}")
    if not _want_triton(y, use_triton):
        return prune24_tokens_t_reference(y, perm, dense_features)
    y = y.contiguous()
    out = torch.empty((c, t), dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return out
    dense = dense_features.to(torch.int8).contiguous() if dense_features is not None else y
    grid = (triton.cdiv(t, _BLOCK_T), triton.cdiv(c, _BLOCK_TC))
    _jit(_prune24_tokens_t_kernel)[grid](
        y,
        perm if perm is not None else y,
        dense,
        out,
        t,
        c,
        PERMUTE=perm is not None,
        HAS_DENSE=dense_features is not None,
        BLOCK_T=_BLOCK_T,
        BLOCK_C=_BLOCK_TC,
    )
    return out


def relu2_grad24_reference(dy2: Tensor, y1: Tensor, y2s: Tensor, mvue: bool) -> Tensor:
    """``dY1`` of ``Y2s = D * ReLU(Y1)^2`` with ``D`` constant: 0 wherever the forward dropped.

    ``D`` is 1 on kept entries (``y2s / ReLU(y1)^2`` for MVUE, i.e. ``1/p``), so
    ``dY1 = dY2 * D * 2 ReLU(Y1)``, which for MVUE is ``dY2 * 2 y2s / ReLU(y1)``.
    """
    dt = torch.promote_types(dy2.dtype, torch.float32)  # fp32 math, fp64 stays fp64
    r = torch.relu(y1.to(dt))
    ys = y2s.to(dt)
    factor = 2 * ys / torch.where(r > 0, r, 1.0) if mvue else 2 * r
    return torch.where(ys != 0, dy2.to(dt) * factor, 0.0).to(dy2.dtype)


def _relu2_grad24_kernel(
    dy2_ptr,  # [N] flat
    y1_ptr,  # [N]
    y2s_ptr,  # [N]
    out_ptr,  # [N]
    N,
    MVUE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dy2 = tl.load(dy2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.maximum(tl.load(y1_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
    ys = tl.load(y2s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MVUE:
        factor = 2 * ys / tl.where(r > 0, r, 1.0)
    else:
        factor = 2 * r
    out = tl.where(ys != 0, dy2 * factor, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def relu2_grad24(dy2: Tensor, y1: Tensor, y2s: Tensor, mvue: bool, use_triton: bool | None = None) -> Tensor:
    """Fused :func:`relu2_grad24_reference` (one pass instead of ~6 on CUDA)."""
    if not _want_triton(dy2, use_triton):
        return relu2_grad24_reference(dy2, y1, y2s, mvue)
    torch._check(dy2.shape == y1.shape == y2s.shape, lambda: "relu2_grad24: shape mismatch")
    dy2, y1, y2s = dy2.contiguous(), y1.contiguous(), y2s.contiguous()
    out = torch.empty_like(dy2)
    n = out.numel()
    if n:
        block = 2048
        _jit(_relu2_grad24_kernel)[(triton.cdiv(n, block),)](dy2, y1, y2s, out, n, MVUE=mvue, BLOCK=block)
    return out


# ------------------------------------------------------------------------------------------
# The op: fxsparse::prune24 (inference semantics)
# ------------------------------------------------------------------------------------------


def _check_center(x: Tensor, center: Tensor | None) -> None:
    c = x.shape[-1]
    torch._check(c % 4 == 0, lambda: f"prune24: last dim must be a multiple of 4, got {c}")
    if center is not None:
        torch._check(
            center.dim() == 0 or tuple(center.shape) == (c,),
            lambda: f"prune24: center must be a scalar or ({c},), got {tuple(center.shape)}",
        )


@torch.library.custom_op("fxsparse::prune24", mutates_args=())
def prune24(x: Tensor, center: Tensor | None = None) -> Tensor:
    """2:4 along the last dim, keeping the 2 entries of each group of 4 farthest from center.

    CPU: the reference; CUDA: the Triton kernel (:func:`prune24_triton`, which the tests run
    on CPU under ``TRITON_INTERPRET=1``).
    """
    _check_center(x, center)
    return prune24_reference(x, center)


@prune24.register_fake
def _(x, center=None):
    _check_center(x, center)
    return x.new_empty(x.shape)  # contiguous, like the real impls (not empty_like: x's strides)


@prune24.register_kernel("cuda")
def _(x, center=None):
    _check_center(x, center)
    return prune24_triton(x, center)


def _prune24_setup(ctx, inputs, output):
    x, center = inputs
    ctx.save_for_backward(x, center)
    ctx.center_shape = None if center is None else tuple(center.shape)


def _prune24_backward(ctx, grad):
    # Straight-through on kept entries; dropped entries are the center, so theirs flows to it.
    x, center = ctx.saved_tensors
    keep = keep24_reference(x, center)
    grad_x = torch.where(keep, grad, torch.zeros_like(grad))
    grad_c = None
    if ctx.center_shape is not None:
        gc = torch.where(keep, torch.zeros_like(grad), grad).reshape(-1, x.shape[-1]).sum(0)
        grad_c = (gc.sum() if ctx.center_shape == () else gc).to(center.dtype)
    return grad_x, grad_c


prune24.register_autograd(_prune24_backward, setup_context=_prune24_setup)
