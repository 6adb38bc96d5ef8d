"""The op's semantics, its CPU reference, fake impl and autograd (opcheck), by property."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxsparse  # noqa: F401
from fxsparse.kernels import keep_mask_reference, threshold_linear_reference

op = torch.ops.fxsparse.threshold_linear.default


def independent(x, w, b, thr, center, scale):
    """Same function written differently: kept columns plus the center's constant term."""
    x64, w64 = x.double(), w.double()
    # dropped entries take the center in x's dtype (the op's documented semantics)
    c = torch.zeros(x.shape[-1], dtype=torch.float64) if center is None else \
        center.to(x.dtype).double().expand(x.shape[-1])
    s = torch.ones(x.shape[-1], dtype=torch.float64) if scale is None else scale.double()
    c32 = torch.zeros(x.shape[-1]) if center is None else center.float().expand(x.shape[-1])
    d = ((x.float() - c32).abs() * s.float())  # the mask compares with the float32 center
    keep = ~(d < thr)
    out = (torch.where(keep, x64 - c, 0.0)) @ w64.t() + c @ w64.t()
    return out if b is None else out + b.double()


@st.composite
def cases(draw):
    k = draw(st.integers(1, 40))
    n = draw(st.integers(1, 24))
    lead = draw(st.sampled_from([(1,), (3,), (2, 5)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    if draw(st.booleans()):  # non-contiguous input
        x = torch.randn(*lead, 2 * k, generator=g).to(dtype)[..., ::2]
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if draw(st.booleans()) else None
    thr = draw(st.sampled_from([0.0, 0.3, 1.0, math.inf]))
    center = draw(st.sampled_from(["none", "scalar", "vector"]))
    center = None if center == "none" else (torch.tensor(0.2) if center == "scalar"
                                            else torch.randn(k, generator=g) * 0.1)
    scale = torch.rand(k, generator=g) + 0.5 if draw(st.booleans()) else None
    return x, w, b, thr, center, scale


@settings(max_examples=60, deadline=None)
@given(cases())
def test_reference_matches_independent_formula(case):
    x, w, b, thr, center, scale = case
    got = op(x, w, b, thr, center, scale, None)
    assert got.shape == (*x.shape[:-1], w.shape[0]) and got.dtype == x.dtype
    want = independent(x, w, b, thr, center, scale)
    tol = 1e-2 if x.dtype == torch.bfloat16 else 1e-5
    # relative to the size of the terms, not of their sum: bf16 outputs that nearly cancel
    # carry an absolute rounding error of the terms' size
    c_fill = 0.0 if center is None else center.to(x.dtype).double().abs().max()
    scale = (x.double().abs().clamp_min(c_fill) @ w.double().abs().t()).norm()
    scale = scale + (0 if b is None else b.double().norm())
    err = (got.double() - want).norm() / scale.clamp_min(1e-6)
    assert err < tol


def test_extremes_and_nan():
    x = torch.tensor([[0.5, -2.0, float("nan"), float("inf")]])
    w = torch.eye(4)
    assert torch.equal(keep_mask_reference(x, 1.0, None, None),
                       torch.tensor([[False, True, True, True]]))
    # NaN is kept, so it reaches the output as in the dense layer (never silently zeroed)
    out = op(x, w, None, 1.0, None, None, None)
    assert torch.isnan(out).all()
    assert torch.equal(op(x[:, :2], w[:2, :2], None, 1.0, None, None, None),
                       torch.tensor([[0.0, -2.0]]))
    # tau = 0 keeps everything (dense), tau = inf drops every finite value
    y = torch.randn(3, 4)
    torch.testing.assert_close(op(y, w, None, 0.0, None, None, None), y)
    torch.testing.assert_close(op(y, w, None, math.inf, torch.tensor(0.25), None, None),
                               torch.full((3, 4), 0.25))


def test_shape_errors_are_clear():
    with pytest.raises(RuntimeError, match="x has 5 input features"):
        op(torch.randn(2, 5), torch.randn(3, 4), None, 0.1, None, None, None)
    with pytest.raises(RuntimeError, match="channel_scale must be"):
        op(torch.randn(2, 4), torch.randn(3, 4), None, 0.1, None, torch.ones(3), None)


@pytest.mark.parametrize("with_center", [False, True])
def test_opcheck(with_center):
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    c = torch.tensor(0.1) if with_center else None
    cb = torch.nn.functional.linear(torch.full((8,), 0.1), w.detach()) if with_center else None
    torch.library.opcheck(op, (x, w, b, 0.5, c, torch.rand(8) + 0.5, cb))
    torch.library.opcheck(op, (x.detach()[None], w.detach(), None, 0.0, None, None, None))


def test_gradient_is_masked_linear():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    out = op(x, w, None, 0.7, None, None, None)
    out.square().sum().backward()
    keep = keep_mask_reference(x.detach(), 0.7, None, None)
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    (torch.where(keep, x2, 0.0) @ w2.t()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert torch.equal(threshold_linear_reference(x.detach(), w.detach(), None, 0.7),
                       torch.where(keep, x.detach(), 0.0) @ w.detach().t())
