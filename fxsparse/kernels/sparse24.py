"""2:4 activation matmul on sparse tensor cores: ``F.linear(prune24(x, c), W, b)`` via cuSPARSELt.

Dropped entries of ``prune24(x, c)`` equal the center ``c``, so::

    F.linear(prune24(x, c), W, b) = (prune24(x, c) - c) @ W.T + (W @ c + b)

and ``prune24(x, c) - c`` is 2:4 along K. ``compress24`` prunes and writes it in cuSPARSELt's
compressed layout; ``torch._cslt_sparse_mm`` multiplies it by ``W.t()``. cuSPARSELt's bias is per
row of the sparse operand (per token), so the per-column ``b + W @ c`` is one in-place add on the
output, only for layers with a bias or a non-zero center. Shapes (torch's cuSPARSELt constraints
for fp16/bf16): K a multiple of 32 (the one-pass compressor), N of 8; M is padded to a multiple of
16 by ``compress24(..., rows=)``; :func:`unsupported_reason` says why other shapes cannot run.
The cuSPARSELt algorithm per problem is searched once (``torch._cslt_sparse_mm_search``, one host
sync per new shape, never during CUDA-graph capture; ``FXSPARSE_CSLT_SEARCH=0`` uses algorithm 0)
and cached for the process.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

import torch
from torch import Tensor

from .center_bias import center_bias_value, fresh_center_bias
from .compress24 import compress24  # one pass into cuSPARSELt's layout (re-exported)

__all__ = ["SPARSE24_IMPL", "available", "compress24", "cslt_mm", "sparse24_linear", "sparse_mm24",
           "unsupported_reason", "SPARSE_ROW_ALIGN", "SPARSE_K_ALIGN"]

log = logging.getLogger("fxsparse")

# Part of the crossover cache key: bump it when compress24 or the matmul call changes, so
# crossovers measured with the old implementation are measured again.
SPARSE24_IMPL = "compress24/2"
SPARSE_ROW_ALIGN = 16  # M of the sparse operand (fp16/bf16; padded up to it here)
# K: cuSPARSELt needs 16; the one-pass compressor (kernels/compress24.py) takes multiples of 32.
SPARSE_K_ALIGN = 32
_DENSE_ALIGN = 8  # N of the dense operand
_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except Exception:  # noqa: BLE001 - builds without the module
        return False


def available(device: torch.device | str) -> bool:
    """True when cuSPARSELt 2:4 matmuls can run on ``device`` (CUDA, sm80+, cuSPARSELt built)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not _cusparselt_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def unsupported_reason(n: int, k: int, dtype: torch.dtype, device: torch.device | str) -> str | None:
    """Why ``sparse24_linear`` cannot run an ``[*, k] x [n, k]^T`` product, or None if it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"2:4 matmuls need CUDA (device is {device.type})"
    if not available(device):
        return "cuSPARSELt is not available on this GPU / torch build"
    if dtype not in _DTYPES:
        return f"2:4 matmuls take fp16/bf16, not {dtype}"
    if k % SPARSE_K_ALIGN:
        return f"in_features {k} is not a multiple of {SPARSE_K_ALIGN} (2:4 compression)"
    if n % _DENSE_ALIGN:
        return f"out_features {n} is not a multiple of {_DENSE_ALIGN} (cuSPARSELt)"
    return None


_logged: set[str] = set()


def log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning("%s", message)


# (m, n, k, dtype, b contiguous, device index) -> cuSPARSELt algorithm id
_ALG: dict[tuple, int] = {}


def _search_enabled() -> bool:
    return os.environ.get("FXSPARSE_CSLT_SEARCH", "1") != "0"


def _algorithm(packed: Tensor, m: int, b: Tensor, transpose_result: bool) -> int:
    key = (m, b.shape[1], b.shape[0], b.dtype, b.is_contiguous(), transpose_result, b.device.index)
    alg = _ALG.get(key)
    if alg is not None:
        return alg
    if not _search_enabled() or torch.cuda.is_current_stream_capturing():
        return 0  # not cached: a later call outside capture searches
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in newer torch; still the 2.11 API
            alg = int(torch._cslt_sparse_mm_search(packed, b, transpose_result=transpose_result))
    except Exception as e:  # noqa: BLE001 - the search is an optimisation; algorithm 0 works
        log_once(f"fxsparse: cuSPARSELt algorithm search failed ({e}); using algorithm 0")
        alg = 0
    _ALG[key] = alg
    return alg


def cslt_mm(packed: Tensor, m: int, b: Tensor, transpose_result: bool = False) -> Tensor:
    """``A @ b`` (or its ``[n, m]`` transpose) for ``packed`` = ``compress24`` of an ``[m, K]`` A.

    ``b`` [K, n] must be row- or column-major. The cuSPARSELt algorithm is searched once per
    problem (see the module docstring).
    """
    alg = _algorithm(packed, m, b, transpose_result)
    out = torch._cslt_sparse_mm(packed, b, transpose_result=transpose_result, alg_id=alg)
    if transpose_result and tuple(out.shape) != (b.shape[1], m):
        out = out.t()
    return out


def sparse_mm24(packed: Tensor, m: int, weight: Tensor) -> Tensor:
    """``A @ weight.t()`` (``[m, N]``) for ``packed = compress24(...)`` of an ``[m, K]`` A."""
    b = weight.t()
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()
    return cslt_mm(packed, m, b)


def sparse24_linear(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    center: Tensor | None = None,
    center_bias: Tensor | None = None,
) -> Tensor:
    """``F.linear(prune24(x2d, center), weight, bias)`` on sparse tensor cores (``[M, N]``).

    Callers check :func:`unsupported_reason` first. ``center_bias`` is ``weight @ center``
    (float32 ``[N]``), computed here when None and a center is given.
    """
    m, k = x2d.shape
    rows = -(-m // SPARSE_ROW_ALIGN) * SPARSE_ROW_ALIGN  # zero rows, not a copy of x
    out = sparse_mm24(compress24(x2d, center, rows=rows), rows, weight)
    if rows != m:
        out = out[:m]
    # -- per-column terms: bias + W @ center, one in-place pass over the output --
    add = None
    if center is not None:
        if center_bias is None:
            center_bias = center_bias_value(weight, center)
        else:
            fresh_center_bias(weight, center, center_bias)
        add = center_bias if bias is None else center_bias + bias.float()
    elif bias is not None:
        add = bias
    if add is not None:
        out.add_(add.to(out.dtype))
    return out
