"""The fused threshold + sparse GEMV kernel against the op's reference, on any input.

Without CUDA the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set before
Triton is first imported, hence the first lines); with CUDA the ``gpu`` tests run it compiled,
with more and larger examples, and ``opcheck`` the op itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before Triton's first import (conftest does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxsparse.kernels import sparse_gemv as sg  # noqa: E402
from fxsparse.kernels.threshold_linear import (  # noqa: E402
    fill_value,
    keep_mask_reference,
)

INTERPRETED = type(sg._threshold_gemv_kernel).__name__ == "InterpretedFunction"
HAS_CUDA = torch.cuda.is_available()

cpu_only = pytest.mark.skipif(not INTERPRETED, reason="interpreter tests (no CUDA)")

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}


@dataclasses.dataclass
class Case:
    rows: int
    n: int
    k: int
    dtype: torch.dtype
    threshold: float
    center: str  # none | scalar | channel
    scale: bool
    bias: bool
    center_bias: bool
    layout: str  # contiguous | strided | transposed | 3d
    specials: int  # NaN / Inf entries planted in x
    seed: int


def cases(max_rows: int, max_n: int, max_k: int, dtype=None, center=None) -> st.SearchStrategy[Case]:
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if dtype is None else [dtype]
    centers = ["none", "scalar", "channel"] if center is None else [center]
    return st.builds(
        Case,
        rows=st.integers(1, max_rows),
        n=st.integers(1, max_n),
        k=st.integers(1, max_k),
        dtype=st.sampled_from(dtypes),
        threshold=st.sampled_from([0.0, -1.0, 0.3, 0.8, 1.5, math.inf]),
        center=st.sampled_from(centers),
        scale=st.booleans(),
        bias=st.booleans(),
        center_bias=st.booleans(),
        layout=st.sampled_from(["contiguous", "strided", "transposed", "3d"]),
        specials=st.sampled_from([0, 0, 0, 1, 3]),
        seed=st.integers(0, 2**31 - 1),
    )


def make_inputs(c: Case, device: str):
    g = torch.Generator().manual_seed(c.seed)
    randn = lambda *s: torch.randn(*s, generator=g)
    x = randn(c.rows, c.k).to(c.dtype)
    for i in range(c.specials):  # NaN, +Inf, -Inf at random places
        r = int(torch.randint(c.rows, (), generator=g))
        j = int(torch.randint(c.k, (), generator=g))
        x[r, j] = (math.nan, math.inf, -math.inf)[i % 3]
    x = x.to(device)  # then the layout (a copy to another device would make it contiguous)
    if c.layout == "strided":
        x = torch.stack([torch.zeros_like(x), x], dim=-1)[..., 1]
    elif c.layout == "transposed":
        x = x.t().contiguous().t()
    elif c.layout == "3d" and c.rows % 2 == 0:
        x = x.reshape(2, c.rows // 2, c.k)
    weight = (randn(c.k, c.n) / math.sqrt(c.k)).to(c.dtype).to(device).t()  # column-major
    bias = randn(c.n).to(c.dtype).to(device) if c.bias else None
    center = None
    if c.center == "scalar":
        center = torch.tensor(0.25, device=device)
    elif c.center == "channel":
        center = (0.5 * randn(c.k)).to(device)
    scale = (0.5 + torch.rand(c.k, generator=g)).to(device) if c.scale else None
    center_bias = None
    if center is not None and c.center_bias:
        center_bias = weight.float() @ center.to(c.dtype).float().expand(c.k)
    return x, weight, bias, center, scale, center_bias


def reference_f64(x, weight, bias, threshold, center, scale) -> torch.Tensor:
    """The op's result in float64: its mask (float32, on x as given) and its dropped value (the
    center in x's dtype), so only the kernel's float32 sums differ from it. Casting x and the
    center to float64 first would drop the unrounded center, ~1% off a small output."""
    up = lambda t: None if t is None else t.double()
    xm = torch.where(keep_mask_reference(x, threshold, center, scale), x, fill_value(x, center))
    return F.linear(up(xm), up(weight), up(bias))


def check(out: torch.Tensor, x, weight, bias, threshold, center, scale, dtype) -> None:
    ref = reference_f64(x, weight, bias, threshold, center, scale)
    assert out.shape == ref.shape and out.dtype == dtype
    out = out.double().cpu()
    ref = ref.cpu()
    assert torch.equal(out.isnan(), ref.isnan()), "NaN positions differ from the reference"
    inf = ref.isinf()
    assert torch.equal(out[inf], ref[inf]), "Inf positions differ from the reference"
    fin = ref.isfinite()
    err = (out[fin] - ref[fin]).norm()
    scale_ = ref[fin].norm()
    if scale_ == 0:
        assert err == 0
    else:
        assert err / scale_ < TOL[dtype], f"relative error {float(err / scale_):.2e}"


def run_case(c: Case, device: str, config=None) -> None:
    x, weight, bias, center, scale, center_bias = make_inputs(c, device)
    out = sg.threshold_gemv(x, weight, bias, c.threshold, center, scale, center_bias, config=config)
    check(out, x, weight, bias, c.threshold, center, scale, c.dtype)


def run_group_case(c: Case, ns: list[int], device: str, config=None) -> None:
    """1-3 weights sharing x and the mask (q/k/v), one launch: each output as if alone."""
    x, _, _, center, scale, _ = make_inputs(c, device)
    members = [make_inputs(dataclasses.replace(c, n=n, seed=c.seed + 1 + i), device)
               for i, n in enumerate(ns)]
    weights = [m[1] for m in members]
    biases = [m[2] for m in members]
    cbs = [None if center is None or not c.center_bias else w.float() @ center.to(c.dtype).float().expand(c.k)
           for w in weights]
    outs = sg.threshold_gemv_group(x, weights, biases, c.threshold, center, scale, cbs, config=config)
    assert len(outs) == len(ns)
    for out, w, b in zip(outs, weights, biases, strict=True):
        check(out, x, w, b, c.threshold, center, scale, c.dtype)


# -- CPU, through the interpreter ---------------------------------------------------------------


@cpu_only
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases(max_rows=16, max_n=150, max_k=150))
def test_matches_reference_cpu(c: Case) -> None:
    run_case(c, "cpu")


def check_masked_input(c: Case, device: str) -> None:
    """The several-row path's mask kernel equals the reference's masked input, bit for bit."""
    x, _, _, center, scale, _ = make_inputs(c, device)
    out = sg.masked_input(x, c.threshold, center, scale)
    ref = torch.where(keep_mask_reference(x, c.threshold, center, scale), x, fill_value(x, center))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())


@cpu_only
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases(max_rows=20, max_n=1, max_k=300))
def test_masked_input_cpu(c: Case) -> None:
    check_masked_input(c, "cpu")


@cpu_only
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=cases(max_rows=8, max_n=100, max_k=200),
    num_sms=st.sampled_from([1, 4, 132]),
    block_n=st.sampled_from([16, 32, 128]),
    chunk_k=st.sampled_from([16, 32, 64]),
    one_step_max=st.sampled_from([0, 64, 512]),
    scratch_group=st.sampled_from([1, 3, 8, 10**6]),
    sub_k=st.sampled_from([8, 16]),
    row_kernel=st.booleans(),
)
def test_block_sizes_cpu(
    c: Case, num_sms: int, block_n: int, chunk_k: int, one_step_max: int, scratch_group: int, sub_k: int,
    row_kernel: bool,
) -> None:
    """Every split (1 … many), masking step, scratch sharing, tile shape and kernel (one-row or
    row-generic) the heuristic may pick gives the same function."""
    cfg = sg._pick_config(
        c.rows,
        c.n,
        c.k,
        c.dtype.itemsize,
        num_sms,
        block_n=block_n,
        chunk_k=chunk_k,
        one_step_max=one_step_max,
        scratch_group=scratch_group,
        sub_k=sub_k,
        row_kernel=row_kernel,
        num_warps=1 if row_kernel else 4,
    )
    run_case(c, "cpu", cfg)


@cpu_only
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=cases(max_rows=1, max_n=100, max_k=300),
    num_sms=st.sampled_from([1, 4, 132]),
    block_n=st.sampled_from([16, 64]),
    chunk_k=st.sampled_from([16, 64]),
    one_step_max=st.sampled_from([0, 512]),
    sub_k=st.sampled_from([1, 8, 16]),
    acc_tile=st.booleans(),
    stages=st.sampled_from([0, 3]),
    atomic_epilogue=st.booleans(),
)
def test_row_kernel_cpu(c: Case, num_sms: int, block_n: int, chunk_k: int, one_step_max: int,
                        sub_k: int, acc_tile: bool, stages: int, atomic_epilogue: bool) -> None:
    """The one-row kernel over its block sizes, splits, masking steps, accumulators, weight
    loops (by hand or Triton's pipeline) and split-K epilogues (partials or atomics); the
    atomic one leaves its sums and counters zero for the next launch."""
    cfg = sg._pick_config(1, c.n, c.k, c.dtype.itemsize, num_sms, block_n=block_n, chunk_k=chunk_k,
                          one_step_max=one_step_max, sub_k=sub_k, row_kernel=True, num_warps=1,
                          acc_tile=acc_tile, stages=stages, atomic_epilogue=atomic_epilogue, tile_bytes=0)
    assert cfg.row_kernel and cfg.stages == stages
    run_case(c, "cpu", cfg)
    if cfg.atomic_epilogue:
        assert not sg._split_sums(torch.device("cpu")).any()
        assert not sg._arrival_counters(torch.device("cpu")).any()


@cpu_only
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=cases(max_rows=sg.MAX_ROW_KERNEL_ROWS, max_n=90, max_k=250),
    num_sms=st.sampled_from([1, 4]),
    programs_per_sm=st.sampled_from([1, 4]),
    block_n=st.sampled_from([16, 64]),
    chunk_k=st.sampled_from([16, 64]),
    one_step_max=st.sampled_from([0, 512]),
    sub_k=st.sampled_from([1, 4, 8]),
    row_dot=st.booleans(),
)
def test_row_kernel_several_rows_cpu(c: Case, num_sms: int, programs_per_sm: int, block_n: int, chunk_k: int,
                                     one_step_max: int, sub_k: int, row_dot: bool) -> None:
    """Up to 16 rows through the one-row kernel's stream (``row_kernel=True``; FMAs up to four
    rows, tensor-core products above or with ``row_dot``): a channel is compacted if any row
    keeps it and each row adds only what it keeps (its own mask exactly), over splits, masking
    steps, tiles and the atomic epilogue; sums and counters end zero."""
    cfg = sg._pick_config(c.rows, c.n, c.k, c.dtype.itemsize, num_sms, row_kernel=True, num_warps=1,
                          programs_per_sm=programs_per_sm, block_n=block_n, chunk_k=chunk_k,
                          one_step_max=one_step_max, sub_k=sub_k, tile_bytes=0, row_dot=row_dot)
    dot = c.rows > 1 and (row_dot or c.rows > sg.MAX_FMA_ROWS)
    assert cfg.row_kernel and cfg.use_dot == dot
    assert cfg.block_r == (max(16, 1 << (c.rows - 1).bit_length()) if dot else 1 << (c.rows - 1).bit_length())
    run_case(c, "cpu", cfg)
    assert not sg._split_sums(torch.device("cpu")).any()
    assert not sg._arrival_counters(torch.device("cpu")).any()


def test_several_rows_pick(monkeypatch) -> None:
    """Two rows take the one-row kernel's stream by default, more only when asked, never when
    deterministic; the op's dispatch (``max_rows``) sends two 16-bit rows there."""
    two = sg._pick_config(2, 4096, 4096, 2, 132, deterministic=False)
    assert two.row_kernel and two.block_r == 2 and not two.use_dot and two.atomic_epilogue
    assert not sg._pick_config(2, 4096, 4096, 2, 132, deterministic=True).row_kernel
    assert not sg._pick_config(3, 4096, 4096, 2, 132, deterministic=False).row_kernel
    assert not sg._pick_config(4, 4096, 4096, 2, 132).row_kernel
    stream = sg._pick_config(4, 4096, 4096, 2, 132, row_kernel=True, deterministic=False)
    assert stream.row_kernel and stream.block_r == 4 and stream.atomic_epilogue and stream.stages == 4
    assert not sg._pick_config(4, 4096, 4096, 2, 132, row_kernel=True, deterministic=True).row_kernel
    assert sg._pick_config(16, 4096, 4096, 2, 132, row_kernel=True, deterministic=False).use_dot
    assert not sg._pick_config(17, 4096, 4096, 2, 132, row_kernel=True, deterministic=False).row_kernel
    assert sg.max_rows(4096, 4096, torch.bfloat16) == sg.max_rows(4096, 4096, torch.float16) == 2
    assert sg.max_rows(4096, 4096, torch.float32) == 1  # unmeasured
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert sg.max_rows(4096, 4096, torch.bfloat16) == 1


@cpu_only
def test_atomic_epilogue_with_biases_cpu() -> None:
    """Atomic split-K (several splits per N-block) with bias, center bias and channel scale,
    twice in a row: the second launch starts from the sums and counters the first one left
    zero."""
    c = Case(rows=1, n=70, k=300, dtype=torch.bfloat16, threshold=0.3, center="channel", scale=True,
             bias=True, center_bias=True, layout="strided", specials=0, seed=3)
    cfg = sg._pick_config(1, c.n, c.k, 2, 4, block_n=32, chunk_k=16, programs_per_sm=4, num_warps=1,
                          stages=3, atomic_epilogue=True, tile_bytes=0)
    assert cfg.split_k > 1 and cfg.atomic_epilogue
    for seed in (3, 4):
        run_case(dataclasses.replace(c, seed=seed), "cpu", cfg)
        assert not sg._split_sums(torch.device("cpu")).any()
        assert not sg._arrival_counters(torch.device("cpu")).any()


@cpu_only
def test_center_bias_follows_weight_updates_cpu() -> None:
    """A folded ``W @ center`` is recomputed when the weight changes in place (optimizer step,
    ``load_state_dict``) or is replaced (``p.data = ...``) after it was computed."""
    from fxsparse.kernels.center_bias import center_bias_value, register_center_bias
    from fxsparse.kernels.threshold_linear import threshold_linear_reference

    torch.manual_seed(0)
    x = torch.randn(1, 40)
    w = torch.randn(40, 24).t()  # column-major, as prepared
    c = torch.tensor(0.3)
    cb = register_center_bias(center_bias_value(w, c), w)
    for update in (lambda: w.mul_(2), lambda: w.copy_(torch.randn(24, 40)), None):
        got = sg.threshold_gemv(x, w, None, 0.5, c, None, cb)
        torch.testing.assert_close(got, threshold_linear_reference(x, w, None, 0.5, c), rtol=1e-4, atol=1e-4)
        if update is not None:
            update()
    w2 = torch.randn(40, 24).t()
    got = sg.threshold_gemv(x, w2, None, 0.5, c, None, cb)  # another weight's storage
    torch.testing.assert_close(got, threshold_linear_reference(x, w2, None, 0.5, c), rtol=1e-4, atol=1e-4)


def test_stream_rule_and_deterministic_rules() -> None:
    """One-row launches stream 4 KB runs in one eight-warp program per SM with one masking
    step, split-K by atomics; under ``torch.use_deterministic_algorithms`` the partials rules
    (one or two warps, fixed summation order) run instead (docs/performance.md)."""
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]:
        cfg = sg._pick_config(1, n, k, 2, 132, deterministic=False)
        assert cfg.num_warps == 8 and cfg.block_n * 2 == 4096 and cfg.sub_k * cfg.block_n * 2 == 16384
        assert cfg.chunks_per_split == 1 and cfg.stages == 4 and cfg.atomic_epilogue
        assert 0.9 * 132 <= -(-n // cfg.block_n) * cfg.split_k <= 1.1 * 132
        exact = sg._pick_config(1, n, k, 2, 132, deterministic=True)
        assert exact.num_warps in (1, 2) and not exact.atomic_epilogue and exact.stages == 0
        torch.use_deterministic_algorithms(True)
        try:
            assert sg._pick_config(1, n, k, 2, 132) == exact
        finally:
            torch.use_deterministic_algorithms(False)
        assert sg._pick_config(1, n, k, 2, 132) == cfg
    assert sg._pick_config(1, 1024, 4096, 2, 132).sub_k == 8  # narrow weight: tiles keep 16 KB


@cpu_only
def test_wide_launch_falls_back_to_partials_cpu(monkeypatch) -> None:
    """More columns than the atomic epilogue's workspace holds: the deterministic rules run."""
    monkeypatch.setattr(sg, "_SUM_CAPACITY", 64)
    picked = []
    real = sg._pick_config
    monkeypatch.setattr(sg, "_pick_config", lambda *a, **kw: picked.append(real(*a, **kw)) or picked[-1])
    run_case(Case(1, 100, 300, torch.bfloat16, 0.5, "none", False, True, False, "contiguous", 0, 5), "cpu")
    assert picked[0].atomic_epilogue and not picked[-1].atomic_epilogue and len(picked) == 2


@cpu_only
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=cases(max_rows=4, max_n=1, max_k=150),
    ns=st.lists(st.integers(1, 90), min_size=1, max_size=3),
    num_sms=st.sampled_from([1, 4]),
    block_n=st.sampled_from([16, 32]),
    row_kernel=st.booleans(),
)
def test_group_matches_reference_cpu(c: Case, ns: list[int], num_sms: int, block_n: int,
                                     row_kernel: bool) -> None:
    cfg = sg._pick_config(c.rows, sum(ns), c.k, c.dtype.itemsize, num_sms, block_n=block_n, chunk_k=32,
                          row_kernel=row_kernel)
    run_group_case(c, ns, "cpu", cfg)


def test_row_pdl_follows_inductor(monkeypatch) -> None:
    """The one-row launch uses PDL when Inductor's kernels do (they signal dependents early),
    unless ``ROW_PDL`` forces it; rows > 1 never (the row-generic kernel has no wait)."""
    import torch._inductor.config as inductor_config

    pick = lambda rows=1: sg._pick_config(rows, 4096, 4096, 2, 132)
    monkeypatch.setattr(inductor_config.triton, "enable_pdl", False)
    assert not pick().pdl
    monkeypatch.setattr(inductor_config.triton, "enable_pdl", True)
    assert pick().pdl and not pick(rows=4).pdl
    monkeypatch.setattr(sg, "ROW_PDL", False)
    assert not pick().pdl
    monkeypatch.setattr(sg, "ROW_PDL", True)
    monkeypatch.setattr(inductor_config.triton, "enable_pdl", False)
    assert pick().pdl


def test_group_rejects_bad_members() -> None:
    x = torch.randn(1, 8)
    w = torch.randn(8, 4).t()
    with pytest.raises(RuntimeError, match="1-3 weights"):
        sg.threshold_gemv_group(x, [w] * 4, [None] * 4, 0.5)
    with pytest.raises(RuntimeError, match="all present or all absent"):
        sg.threshold_gemv_group(x, [w, w], [torch.zeros(4), None], 0.5)


@cpu_only
@pytest.mark.parametrize("rows", [1, 5])
def test_output_fully_written_cpu(monkeypatch, rows: int) -> None:
    """Output and workspace start as NaN: any element the kernel skips shows up."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    c = Case(rows, 67, 131, torch.bfloat16, 0.8, "channel", True, True, True, "contiguous", 0, 1)
    run_case(c, "cpu", sg._pick_config(rows, 67, 131, 2, 132, block_n=16, chunk_k=16))


@cpu_only
def test_extreme_thresholds_cpu() -> None:
    """τ = 0 is the dense layer; τ = ∞ leaves only bias + W·center (and the non-finite x)."""
    for thr, center in [(0.0, "none"), (math.inf, "channel"), (math.inf, "none")]:
        run_case(Case(3, 40, 90, torch.float32, thr, center, False, True, False, "contiguous", 0, 7), "cpu")


def test_supports_declines_what_it_cannot_run() -> None:
    w = torch.randn(64, 32)
    assert not sg.supports(torch.randn(32), w)  # CPU
    if HAS_CUDA:
        wc = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16).t()
        x = torch.randn(1, 32, device="cuda", dtype=torch.bfloat16)
        assert sg.supports(x, wc)
        rows = sg.max_rows(64, 32, torch.bfloat16) + 1  # above the measured crossover
        assert not sg.supports(torch.randn(rows, 32, device="cuda", dtype=torch.bfloat16), wc)
        assert not sg.supports(x, wc.contiguous())  # row-major
        assert not sg.supports(x.float(), wc)  # dtype mismatch
        assert not sg.supports(torch.randn(64, 32, device="cuda", dtype=torch.bfloat16), wc)


# -- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("center", ["none", "scalar", "channel"])
def test_matches_reference_gpu(dtype: torch.dtype, center: str) -> None:
    """Split in items so ``pytest -n`` compiles the kernel variants in parallel."""

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(c=cases(max_rows=16, max_n=3000, max_k=3000, dtype=dtype, center=center))
    def prop(c: Case) -> None:
        run_case(c, "cuda")
        check_masked_input(c, "cuda")

    prop()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
def test_several_rows_gpu() -> None:
    """The stream rule on real hardware (programs race, unlike the interpreter's): 1-16 rows in
    the one-row kernel (FMAs or tensor cores), and the decode shapes' grids."""

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(c=cases(max_rows=sg.MAX_ROW_KERNEL_ROWS, max_n=5000, max_k=5000), row_dot=st.booleans())
    def prop(c: Case, row_dot: bool) -> None:
        cfg = sg._pick_config(c.rows, c.n, c.k, c.dtype.itemsize, sg._num_sms(torch.device("cuda")),
                              row_kernel=True, row_dot=row_dot)
        run_case(c, "cuda", cfg)

    prop()
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        for rows in (1, 2, 3, 4, 16):
            c = Case(rows, n, k, torch.bfloat16, 0.7, "channel", True, True, True, "contiguous", 2, n + rows)
            cfg = sg._pick_config(rows, n, k, 2, sg._num_sms(torch.device("cuda")), row_kernel=True)
            assert cfg.split_k > 1 and cfg.atomic_epilogue
            for _ in range(3):  # the sums and counters each launch leaves for the next one
                run_case(c, "cuda", cfg)
    assert not sg._split_sums(torch.device("cuda")).any()
    assert not sg._arrival_counters(torch.device("cuda")).any()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("center", ["none", "channel"])
def test_group_matches_reference_gpu(center: str) -> None:
    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(c=cases(max_rows=2, max_n=1, max_k=3000, center=center),  # the op's dispatch: 1-2 rows
           ns=st.lists(st.integers(1, 3000), min_size=1, max_size=3))
    def prop(c: Case, ns: list[int]) -> None:
        run_group_case(c, ns, "cuda")

    prop()
    # the decode shapes: q/k/v of Llama-3-8B, gate/up
    for ns, k in [([4096, 1024, 1024], 4096), ([14336, 14336], 4096)]:
        c = Case(1, 1, k, torch.bfloat16, 0.7, center, False, False, True, "contiguous", 0, k)
        run_group_case(c, ns, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_output_fully_written_gpu(monkeypatch, rows: int) -> None:
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    for n, k in [(4096, 4096), (1000, 3001), (14336, 4096)]:
        run_case(
            Case(rows, n, k, torch.bfloat16, 0.8, "channel", True, True, True, "contiguous", 0, n), "cuda"
        )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
def test_cuda_graph_replay_gpu() -> None:
    """The launch captures: no host sync, no call-time tuning; replays follow new inputs."""
    c = Case(1, 4096, 4096, torch.bfloat16, 0.7, "scalar", False, True, True, "contiguous", 0, 3)
    x, weight, bias, center, scale, cb = make_inputs(c, "cuda")
    sg.threshold_gemv(x, weight, bias, c.threshold, center, scale, cb)  # warm-up compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sg.threshold_gemv(x, weight, bias, c.threshold, center, scale, cb)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        check(out, x, weight, bias, c.threshold, center, scale, c.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("pdl", [False, True])
def test_chain_in_cuda_graph_gpu(pdl: bool) -> None:
    """Each launch reads the x the previous one wrote, inside one CUDA graph: with programmatic
    dependent launch a program may start before its producer ends, so its wait must come
    before every load; an early read shows up as a wrong layer."""
    n = k = 2048
    ws = [(torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * k**-0.5).t() for _ in range(6)]
    x0 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    cfg = sg._pick_config(1, n, k, 2, sg._num_sms(x0.device), pdl=pdl)

    def chain():
        h = [x0]
        for w in ws:
            h.append(sg.threshold_gemv(h[-1], w, None, 0.5, config=cfg))
        return h

    chain()  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        hs = chain()
    for _ in range(3):
        x0.copy_(torch.randn_like(x0))
        graph.replay()
        for i, w in enumerate(ws):  # each layer against the reference on the graph's own input
            check(hs[i + 1], hs[i], w, None, 0.5, None, None, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_two_streams_gpu(deterministic: bool, threads: int) -> None:
    """Two models on two streams, from one thread or a thread each: their split-K epilogues
    share the device's counters (and, atomic, its sums), so the launches must not overlap."""
    n = k = 4096
    inputs = [make_inputs(Case(1, n, k, torch.bfloat16, 0.5, "none", False, True, False, "contiguous",
                               0, seed), "cuda") for seed in (11, 12)]
    for x, *_ in inputs:  # only the first K-split keeps channels: the second arrives at once,
        x[:, k // 2:] = 0  # so with the other stream's launch running its count would mix in
    # a grid for 4 SMs: each launch leaves the GPU room for the other stream's, as small
    # layers or a busy device would
    cfg = sg._pick_config(1, n, k, 2, 4, deterministic=deterministic)
    assert cfg.split_k > 1 and cfg.atomic_epilogue != deterministic
    for x, w, b, *_ in inputs:  # compile first: the queues below must fill faster than they drain
        sg.threshold_gemv(x, w, b, 0.5, config=cfg)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs: list[list[torch.Tensor]] = [[], []]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            torch.cuda._sleep(20_000_000)  # ~10 ms: both queues fill before either runs

    def launch(i: int) -> None:
        x, w, b, *_ = inputs[i]
        with torch.cuda.stream(streams[i]):
            outs[i].append(sg.threshold_gemv(x, w, b, 0.5, config=cfg))

    if threads == 1:
        for _ in range(20):  # launches alternate; unordered, the GPU would overlap the queues
            launch(0)
            launch(1)
    else:
        workers = [threading.Thread(target=lambda i=i: [launch(i) for _ in range(20)]) for i in (0, 1)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    assert [len(o) for o in outs] == [20, 20]
    torch.cuda.synchronize()
    for (x, w, b, *_), got in zip(inputs, outs, strict=True):
        for out in got:
            check(out, x, w, b, 0.5, None, None, torch.bfloat16)
    assert not sg._split_sums(torch.device("cuda")).any()
    assert not sg._arrival_counters(torch.device("cuda")).any()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
def test_opcheck_gpu() -> None:
    import fxsparse.kernels  # noqa: F401  (registers the op)

    for rows, center in [(1, None), (4, "channel"), (16, "scalar")]:
        c = Case(
            rows, 512, 768, torch.bfloat16, 0.5, center or "none", False, True, True, "contiguous", 0, rows
        )
        x, weight, bias, ctr, scale, cb = make_inputs(c, "cuda")
        # rows above max_rows take the op's fallback (mask + cuBLAS): opcheck covers both
        assert sg.supports(x, weight) == (rows <= sg.max_rows(512, 768, torch.bfloat16))
        torch.library.opcheck(
            torch.ops.fxsparse.threshold_linear.default, (x, weight, bias, 0.5, ctr, scale, cb)
        )
        out = torch.ops.fxsparse.threshold_linear(x, weight, bias, 0.5, ctr, scale, cb)
        check(out, x, weight, bias, 0.5, ctr, scale, c.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
def test_reduce_overhead_compile_gpu(monkeypatch) -> None:
    """The op called directly, no lower pass to reserve the kernel's persistent state: its
    first call is cudagraph trees' warm-up, whose pool must not get that state."""
    import fxsparse.kernels  # noqa: F401

    monkeypatch.setattr(sg, "_counters", {})  # as in a fresh process, whatever ran before
    monkeypatch.setattr(sg, "_sums", {})
    c = Case(1, 1024, 2048, torch.bfloat16, 0.6, "channel", False, True, True, "contiguous", 0, 5)
    x, weight, bias, ctr, scale, cb = make_inputs(c, "cuda")

    def f(x):
        return torch.ops.fxsparse.threshold_linear(x * 1.0, weight, bias, 0.6, ctr, None, cb)

    fc = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        x = torch.randn_like(x)
        check(fc(x).clone(), x, weight, bias, 0.6, ctr, None, c.dtype)
    assert sg._sums and sg._counters  # the atomic epilogue ran and made its state
