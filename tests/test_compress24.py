"""2:4 compression into cuSPARSELt's layout: reference vs torch's own output, Triton vs reference."""

import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxsparse.kernels import compress24 as C
from fxsparse.kernels.prune24 import prune24_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
needs_triton = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1"
)
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# x and torch._cslt_compress(x) for 2:4-sparse bf16 inputs, saved on an H100 (torch 2.11,
# cuSPARSELt 0.8) by bench/probe/cslt_layout.py: the layout is checked against the real thing.
DUMP = Path(__file__).parent / "data" / "cslt_compress_h100.pt"


def bits(t: torch.Tensor, k: int) -> torch.Tensor:
    """Compressed data of an [M, k] matrix as int16: the flat prefix of torch's [M, ceil] buffer."""
    return t.reshape(-1)[: C.compressed_numel(t.shape[0], k)].view(torch.int16)


@pytest.mark.parametrize("key", sorted(torch.load(DUMP)))
def test_reference_matches_cusparselt_bytes(key):
    e = torch.load(DUMP)[key]
    m, k, _ = key
    assert torch.equal(bits(C.compress24_reference(e["x"]), k), e["words"])
    assert torch.equal(C.decompress24_reference(e["words"].view(torch.bfloat16), m, k), e["x"])
    assert C.compressed_numel(m, k) == e["words"].numel()
    out = C.compress24_reference(e["x"])
    assert out.shape[0] == m and out.numel() >= C.compressed_numel(m, k)  # torch's 2-D shape


@needs_triton
@pytest.mark.parametrize("key", sorted(torch.load(DUMP)))
def test_triton_matches_cusparselt_bytes(key):
    e = torch.load(DUMP)[key]
    assert torch.equal(bits(C.compress24(e["x"].to(DEV)), e["x"].shape[1]).cpu(), e["words"])


@st.composite
def cases(draw):
    m = draw(st.integers(1, 130))
    k = 32 * draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    center = draw(st.sampled_from([None, "scalar", "channel"]))
    ties = draw(st.booleans())
    nan = draw(st.booleans())
    return m, k, dtype, center, ties, nan


def make(m, k, dtype, center, ties, nan, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if ties:  # many exact ties: the lower index must win everywhere
        x = x.round()
    if nan:
        x[0, 1] = math.nan
        x[-1, -1] = math.inf
    c = {None: None, "scalar": 0.5, "channel": torch.randn(k, generator=g)}[center]
    return x.to(dtype), c


@needs_triton
@FAST
@given(cases())
def test_triton_matches_reference(case):
    x, c = make(*case)
    ref = C.compress24_reference(x, c)
    out = C.compress24(x.to(DEV), c if not isinstance(c, torch.Tensor) else c.to(DEV)).cpu()
    assert out.shape == ref.shape
    assert torch.equal(bits(out, x.shape[1]), bits(ref, x.shape[1]))


@needs_triton
@pytest.mark.parametrize("center", [None, "channel"])
def test_padding_rows_are_the_center(center):
    """``rows=`` pads the compressed matrix as if extra rows of x equalled the center (zeros)."""
    x, c = make(20, 64, torch.bfloat16, center, False, False)
    fill = torch.zeros(64) if c is None else c
    padded = torch.cat([x, fill.to(x.dtype).expand(12, 64)])
    out = C.compress24(x.to(DEV), c if c is None else c.to(DEV), rows=32).cpu()
    assert torch.equal(bits(out, 64), bits(C.compress24_reference(padded, c), 64))


@FAST
@given(cases())
def test_decompress_is_prune24_minus_center(case):
    """The stored values are prune24(x, c) - c, so sparse_mm(compressed, W.T) + W c is the layer."""
    x, c = make(*case)
    m, k = x.shape
    fill = torch.zeros((), dtype=x.dtype) if c is None else torch.as_tensor(c).to(x.dtype)
    expect = (prune24_reference(x, c).float() - fill.float()).to(x.dtype)
    got = C.decompress24_reference(C.compress24_reference(x, c), m, k)
    assert torch.equal(got.isnan(), expect.isnan())
    assert torch.equal(got.nan_to_num(), expect.nan_to_num())


def test_bad_input_is_named():
    with pytest.raises(RuntimeError, match="multiple of 32"):
        C.compress24_reference(torch.randn(4, 48, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        C.compress24_reference(torch.randn(4, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [64, 200, 1024])
@pytest.mark.parametrize("center", [None, "channel"])
def test_sparse_mm_on_compressed(dtype, m, center):
    """cuSPARSELt's product on our buffer equals F.linear(prune24(x, c), W) (and torch's bytes).

    cuSPARSELt takes M in multiples of 16: m = 200 goes through ``rows=`` padding.
    """
    n, k = 256, 512
    rows = -(-m // 16) * 16
    x, c = make(m, k, dtype, center, False, False, seed=m)
    x = x.cuda()
    c = c.cuda() if isinstance(c, torch.Tensor) else c
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    buf = C.compress24(x, c, rows=rows)
    fill = torch.zeros((), device="cuda", dtype=dtype) if c is None else c.to(dtype)
    pruned = prune24_reference(x, c)
    padded = torch.cat([pruned, fill.expand(rows - m, k)]) if rows > m else pruned
    torch_buf = torch._cslt_compress(padded - fill)
    if rows == m:  # byte for byte; padding rows may differ only in the codes of all-zero groups
        assert torch.equal(bits(buf, k), bits(torch_buf, k))
    dense = C.decompress24_reference(buf, rows, k)
    assert torch.equal(dense, C.decompress24_reference(torch_buf, rows, k))
    out = torch._cslt_sparse_mm(buf, w.t())[:m].float()
    if c is not None:
        out = out + w.float() @ fill.float().expand(k)
    ref = torch.nn.functional.linear(pruned.double(), w.double())
    assert (out.double() - ref).norm() / ref.norm() < 1e-2
