"""``fxsparse::keep_tap``: record the input a sparse op judges, for comparing with eager.

A debugging op, inserted by ``passes/tap.py`` (backend option ``keep_taps``) in front of each
sparse site of a compiled graph: it returns a copy of ``x`` (so the site reads the same values
and the tap is never dead code) and appends to ``RECORDS[name]`` the input the op's mask judges:
``x`` rounded to ``dtype`` (an accumulated float32 sum is rounded so by the kernel), then
``act(x) * x_mul`` for a fused activation, rounded per op as eager rounds it. ``keep_agreement``
(``fxsparse.inspection``) compares those inputs' keep decisions with eager's.

It runs host code, so under CUDA graphs it records only the calls that run outside a replay
(the first, warm-up call of a ``reduce-overhead`` graph, which is what the check runs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .threshold_linear import ACTIVATIONS, activation_reference

__all__ = ["RECORDS", "keep_tap", "tapped_input"]

RECORDS: dict[str, list[Tensor]] = {}  # site name -> the judged input of each call, in call order


def tapped_input(x: Tensor, x_mul: Tensor | None, act: str, dtype: torch.dtype | None) -> Tensor:
    """The input the op's mask judges (see the module docstring)."""
    if dtype is not None:
        x = x.to(dtype)
        x_mul = None if x_mul is None else x_mul.to(dtype)
    return activation_reference(x, act, x_mul) if act else x


def _check(x: Tensor, x_mul: Tensor | None, act: str, name: str) -> None:
    torch._check(bool(name), lambda: "keep_tap: name must not be empty")
    torch._check(not act or act in ACTIVATIONS, lambda: f"keep_tap: unknown activation {act!r}")
    torch._check(x_mul is None or (bool(act) and x_mul.shape == x.shape),
                 lambda: "keep_tap: x_mul needs act and x's shape")


@torch.library.custom_op("fxsparse::keep_tap", mutates_args=())
def keep_tap(x: Tensor, x_mul: Tensor | None, act: str, dtype: torch.dtype | None, name: str) -> Tensor:
    """``x.clone()``; records ``tapped_input(x, x_mul, act, dtype)`` under ``name``."""
    _check(x, x_mul, act, name)
    RECORDS.setdefault(name, []).append(tapped_input(x, x_mul, act, dtype).detach().clone())
    return x.clone()


@keep_tap.register_fake
def _(x, x_mul, act, dtype, name):
    _check(x, x_mul, act, name)
    return torch.empty_like(x)
