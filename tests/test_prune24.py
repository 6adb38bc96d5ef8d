"""2:4 pruning kernels vs their plain-torch references (Triton under TRITON_INTERPRET=1 on CPU)."""

import math
import os

import torch

# Without a GPU the Triton kernels run in the interpreter. Set before triton is imported here;
# the kernels are jitted lazily, so this holds even when another test imported them first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.library import opcheck  # noqa: E402

from fxsparse.kernels import prune24 as P  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEV = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FAST = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality with NaN == NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@st.composite
def prune_cases(draw):
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    c = 4 * draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    ties = draw(st.booleans())  # values from a tiny set: many exact ties within groups
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (*lead, c)
    if ties:
        x = torch.randint(-2, 3, shape, generator=gen).to(dtype)
    else:
        x = torch.randn(shape, generator=gen).to(dtype)
    if draw(st.booleans()) and x.numel():
        flat = x.view(-1)
        flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=gen)] = math.nan
    kind = draw(st.sampled_from(["none", "scalar", "channel"]))
    center = {
        "none": None,
        "scalar": torch.tensor(draw(st.sampled_from([0.0, 0.5, -1.0, 1.0]))),
        "channel": torch.randint(-1, 2, (c,), generator=gen).float() * 0.5,
    }[kind]
    return x, center


def test_reference_semantics_small():
    x = torch.tensor([[3.0, -4.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    assert P.prune24_reference(x).tolist() == [[3.0, -4.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]
    # center 1: distances 2, 5, 0, 1 / all 0: ties -> lower index wins
    assert P.prune24_reference(x, torch.tensor(1.0)).tolist() == [[3.0, -4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    x = torch.tensor([[math.nan, 0.0, 5.0, 1.0]])
    out = P.prune24_reference(x)
    assert math.isnan(out[0, 0]) and out[0, 2] == 5.0 and out[0, 1] == 0 and out[0, 3] == 0


@needs_triton
@FAST
@given(prune_cases())
def test_prune24_triton_matches_reference(case):
    x, center = case
    c = None if center is None else center.to(DEV)
    got = P.prune24_triton(x.to(DEV), c).cpu()
    assert same(got, P.prune24_reference(x, center))


@needs_triton
@FAST
@given(prune_cases())
def test_prune24_op_keeps_two_of_four(case):
    x, center = case
    out = P.prune24(x.to(DEV), None if center is None else center.to(DEV)).cpu()  # CPU: reference
    assert same(out, P.prune24_reference(x, center))
    changed = (out != x) & ~(out.isnan() & x.isnan())
    assert bool((changed.reshape(*x.shape[:-1], -1, 4).sum(-1) <= 2).all())


@needs_triton
@FAST
@given(
    rows=st.integers(1, 40),
    groups=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    method=st.sampled_from(["naive", "soft_threshold"]),
    seed=st.integers(0, 1000),
)
def test_sparsify24_triton_matches_reference(rows, groups, dtype, method, seed):
    y = torch.randn(rows, 4 * groups, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out, counts = P.sparsify24(y.to(DEV), method, relu2=True, count=True, seed=0, use_triton=True)
    ref = P.sparsify24_reference(torch.relu(y.float()).square(), method).to(dtype)
    out = out.cpu()
    assert P.is_24(out)
    # The interpreter casts fp32->bf16/fp16 by truncation where torch rounds: one ulp apart.
    tol = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert torch.equal(counts.cpu(), (out != 0).sum(0, dtype=torch.int32))


def _mvue_stats(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusion probabilities of the MVUE rule and the per-entry variance v^2 (1/p - 1)."""
    g = v.reshape(-1, 4).abs()
    s, amax = g.sum(-1, keepdim=True), g.amax(-1, keepdim=True)
    capped = 2 * amax >= s
    p = torch.where(capped, g / (s - amax).clamp_min(1e-30), 2 * g / s.clamp_min(1e-30))
    first = torch.zeros_like(g, dtype=torch.bool)
    first[torch.arange(len(g)), P._rank4(g).argmin(-1)] = True
    p = torch.where(capped & first, 1.0, p).clamp(max=1.0)
    var = torch.where(p > 0, g**2 * (1 / p.clamp_min(1e-30) - 1), 0.0)
    return p.reshape(v.shape), var.reshape(v.shape)


# One row per case: generic, one large entry (capped p = 1), two non-zeros, zeros, ties.
MVUE_ROW = torch.tensor(
    [[0.3, 1.2, 0.5, 0.9, 5.0, 0.2, 0.1, 0.4, 0.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]]
    + [[1.0, 1.0, 1.0, 1.0, 0.0, 0.7, 0.0, 0.0, 2.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.25, 0.25]]
)


def _check_unbiased(samples: torch.Tensor, v: torch.Tensor) -> None:
    """Mean of N draws within 5 standard errors of v (exact variance of the estimator).

    Per entry the false-failure rate is ~6e-7 (normal approximation); 32 entries.
    """
    n = samples.shape[0]
    _, var = _mvue_stats(v)
    err = (samples.double().mean(0) - v.double()).abs()
    bound = 5 * (var.double() / n).sqrt() + 1e-6
    assert bool((err <= bound).all()), (err, bound)
    assert all(P.is_24(s) for s in samples[:50])
    # groups with <= 2 non-zeros are reproduced exactly, every draw
    few = ((v != 0).reshape(-1, 4).sum(-1) <= 2).repeat_interleave(4).reshape(v.shape)
    assert torch.equal(samples[:, few], v[few].expand(n, -1))


def test_mvue_reference_unbiased():
    v = MVUE_ROW.reshape(-1)
    n = 20000
    samples = P.sparsify24_reference(
        v.expand(n, -1).contiguous(), "mvue", generator=torch.Generator().manual_seed(0)
    )
    _check_unbiased(samples, v)


@needs_triton
def test_mvue_triton_unbiased():
    v = MVUE_ROW.reshape(-1)
    n = 1024
    samples, _ = P.sparsify24(v.expand(n, -1).contiguous().to(DEV), "mvue", seed=1234, use_triton=True)
    _check_unbiased(samples.cpu(), v)


def test_mvue_inclusion_probabilities():
    """Empirical keep rates match p (so variance is the minimum sum v^2 (1/p - 1))."""
    v = MVUE_ROW.reshape(-1)
    n = 20000
    s = P.sparsify24_reference(
        v.expand(n, -1).contiguous(), "mvue", generator=torch.Generator().manual_seed(1)
    )
    p, _ = _mvue_stats(v)
    rate = (s != 0).double().mean(0)
    torch.testing.assert_close(rate[v != 0], p[v != 0].double(), atol=0.02, rtol=0)


def test_soft_threshold_reference():
    v = torch.tensor([[4.0, 1.0, 3.0, 2.0, -5.0, 1.0, 1.0, 1.0]])
    out = P.sparsify24_reference(v, "soft_threshold")
    # t = 3rd largest |v|: 2 -> [2, 0, 1, 0]; t = 1 -> [-4, 0, 0, 0] (tie: index 1 kept, as 0)
    assert out.tolist() == [[2.0, 0.0, 1.0, 0.0, -4.0, 0.0, 0.0, 0.0]]


@needs_triton
@FAST
@given(
    groups=st.integers(1, 30),
    feats=st.integers(1, 70),
    permute=st.booleans(),
    dense=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_prune24_tokens_t_matches_reference(groups, feats, permute, dense, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    t = 4 * groups
    y = torch.randint(-1, 2, (t, feats), generator=gen).float() if ties else torch.randn(t, feats)
    perm = torch.randperm(t, generator=gen) if permute else None
    dmask = torch.rand(feats, generator=gen) < 0.2 if dense else None
    ref = P.prune24_tokens_t_reference(y, perm, dmask)
    got = P.prune24_tokens_t(
        y.to(DEV),
        None if perm is None else perm.to(DEV),
        None if dmask is None else dmask.to(DEV),
        use_triton=True,
    ).cpu()
    assert torch.equal(got, ref)
    assert P.is_24(ref, dim=-1)
    if dmask is not None:
        assert not ref[dmask].any()


@pytest.mark.parametrize("center", [None, "scalar", "channel"])
def test_opcheck_prune24(center):
    x = torch.randn(3, 2, 8, requires_grad=True)
    c = {None: None, "scalar": torch.tensor(0.25), "channel": torch.randn(8)}[center]
    if c is not None:
        c.requires_grad_(True)
    opcheck(torch.ops.fxsparse.prune24, (x, c))


def test_prune24_nan_kept_unless_three_nonfinite_in_a_group():
    n, i = math.nan, math.inf
    out = P.prune24_reference(torch.tensor([[n, 0.0, 5.0, 1.0], [n, n, n, 1.0], [i, -i, n, 0.0]]))
    assert same(out, torch.tensor([[n, 0.0, 5.0, 0.0], [n, n, 0.0, 0.0], [i, -i, 0.0, 0.0]]))


@needs_triton
@pytest.mark.parametrize("center", [None, "channel"])
def test_prune24_output_strides_agree_on_transposed_input(center):
    """Fake, CPU and CUDA (Triton) impls all return a contiguous tensor of x's shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(8, 4).t()  # [4, 8], column-major
    c = None if center is None else torch.randn(8)
    with FakeTensorMode() as mode:
        fake = torch.ops.fxsparse.prune24(mode.from_tensor(x), None if c is None else mode.from_tensor(c))
    cpu = torch.ops.fxsparse.prune24(x, c)
    triton_out = P.prune24_triton(x.to(DEV), None if c is None else c.to(DEV))
    assert fake.stride() == cpu.stride() == triton_out.stride() == (8, 1)
    assert same(cpu, P.prune24_reference(x.contiguous(), c))
    xt = torch.randn(2, 8, 3).transpose(1, 2).requires_grad_(True)  # [2, 3, 8], non-contiguous
    opcheck(torch.ops.fxsparse.prune24, (xt, c))


def test_prune24_gradient_straight_through():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(8, dtype=torch.float64, requires_grad=True)
    out = torch.ops.fxsparse.prune24(x, c)
    g = torch.randn_like(out)
    gx, gc = torch.autograd.grad(out, (x, c), g)
    keep = P.keep24_reference(x.detach(), c.detach())
    assert torch.equal(gx, torch.where(keep, g, 0.0))
    torch.testing.assert_close(gc, torch.where(keep, 0.0, g).sum(0))


def test_bad_shapes_raise():
    with pytest.raises(RuntimeError, match="multiple of 4"):
        P.prune24_reference(torch.randn(2, 6))
    with pytest.raises(RuntimeError, match="center must be"):
        torch.ops.fxsparse.prune24(torch.randn(2, 8), torch.randn(4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_kernels_match_reference(dtype):
    if INTERPRET:
        pytest.skip("interpreter mode: the CPU tests cover the kernels")
    x = torch.randn(300, 1024, device="cuda").to(dtype)
    c = torch.randn(1024, device="cuda")
    assert same(P.prune24(x, c).cpu(), P.prune24_reference(x.cpu(), c.cpu()))
    for m in ("naive", "soft_threshold"):
        out, _ = P.sparsify24(x, m, relu2=True)
        ref = P.sparsify24_reference(torch.relu(x.float()).square(), m).to(dtype)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    perm = torch.randperm(300 - 300 % 4, device="cuda")
    y = x[: len(perm)]
    assert torch.equal(P.prune24_tokens_t(y, perm), P.prune24_tokens_t_reference(y, perm))


@needs_triton
@pytest.mark.parametrize("mvue", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_grad24_matches_reference(mvue, dtype):
    g = torch.Generator().manual_seed(0)
    y1 = torch.randn(24, 40, generator=g).to(dtype)
    y2s, _ = P.sparsify24(y1.to(DEV), "mvue" if mvue else "naive", relu2=True, seed=3, use_triton=True)
    y2s = y2s.cpu()  # the Triton kernels run where DEV is (CPU tensors only when interpreted)
    dy2 = torch.randn(24, 40, generator=g).to(dtype)
    got = P.relu2_grad24(dy2.to(DEV), y1.to(DEV), y2s.to(DEV), mvue, use_triton=True).cpu()
    want = P.relu2_grad24_reference(dy2, y1, y2s, mvue)
    tol = 0.0 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert not got[y2s == 0].any()  # the forward mask holds in the backward
