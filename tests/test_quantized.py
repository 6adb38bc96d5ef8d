"""8-bit weights (int8, fp8 e4m3 with per-output-channel scales): the ops' references, fake impls
(opcheck), the kernel against the reference (Triton's interpreter on CPU, compiled on the GPU),
and ``fxsparse.quantized`` on torchao's tensors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sparse_gemv import (
    HAS_CUDA,
    INTERPRETED,
    TOL,
    Case,
    cases,
    check,
    cpu_only,
    make_inputs,
    reference_f64,
)

import fxsparse.kernels  # noqa: F401  (registers the ops)
from fxsparse.kernels import sparse_gemv as sg
from fxsparse.kernels.center_bias import center_bias_value, dequantize, register_center_bias
from fxsparse.kernels.threshold_linear import ACTIVATIONS, activation_reference, keep_mask_reference

OPS = torch.ops.fxsparse
QDTYPES = [torch.int8, torch.float8_e4m3fn]
needs_gpu = pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")


def quantize(w: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of ``w`` [N, K] as torchao's weight-only configs do it:
    (data [N, K] in qdtype, float32 scale [N]); the data keeps ``w``'s strides."""
    qmax = 127.0 if qdtype == torch.int8 else 448.0
    scale = (w.float().abs().amax(1) / qmax).clamp_min(1e-8)
    q = w.float() / scale[:, None]
    q = q.round().clamp(-127, 127) if qdtype == torch.int8 else q.clamp(-448, 448)
    return q.to(qdtype), scale


def independent(x, q, scale, b, thr, center, cscale):
    """float64: kept columns times the dequantized weight, plus the center's constant term."""
    k = x.shape[-1]
    w = q.double() * scale.double()[:, None]
    c = torch.zeros(k, dtype=torch.float64) if center is None else center.to(x.dtype).double().expand(k)
    c32 = torch.zeros(k) if center is None else center.float().expand(k)
    s = torch.ones(k) if cscale is None else cscale.float()
    keep = ~((x.float() - c32).abs() * s < thr)
    out = torch.where(keep, x.double() - c, 0.0) @ w.t() + c @ w.t()
    return out if b is None else out + b.double()


@st.composite
def op_cases(draw, max_k: int = 40, max_n: int = 24):
    k, n = draw(st.integers(1, max_k)), draw(st.integers(1, max_n))
    lead = draw(st.sampled_from([(1,), (2,), (2, 3)]))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float32, torch.float16]))
    qdtype = draw(st.sampled_from(QDTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(*lead, k, generator=g).to(dtype)
    q, scale = quantize(torch.randn(n, k, generator=g), qdtype)
    if draw(st.booleans()):
        q = q.t().contiguous().t()  # column-major, as prepared
    b = torch.randn(n, generator=g).to(dtype) if draw(st.booleans()) else None
    thr = draw(st.sampled_from([0.0, 0.3, 1.0, math.inf]))
    center = draw(st.sampled_from([None, "scalar", "vector"]))
    center = None if center is None else (torch.tensor(0.2) if center == "scalar"
                                          else torch.randn(k, generator=g) * 0.1)
    cscale = torch.rand(k, generator=g) + 0.5 if draw(st.booleans()) else None
    return x, q, scale, b, thr, center, cscale


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-6))


# -- the ops: references, fake impls, errors (CPU) -------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(op_cases())
def test_reference_is_the_dequantized_layer(case) -> None:
    """``threshold_linear`` with ``weight_scale``: the dequantized layer in float32, rounded once."""
    x, q, scale, b, thr, center, cscale = case
    got = OPS.threshold_linear(x, q, b, thr, center, cscale, None, scale)
    assert got.shape == (*x.shape[:-1], q.shape[0]) and got.dtype == x.dtype
    want = independent(x, q, scale, b, thr, center, cscale)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[x.dtype]
    assert _rel(got, want) < tol


@settings(max_examples=15, deadline=None)
@given(op_cases(), st.integers(1, 3), st.sampled_from(sorted(ACTIVATIONS)), st.booleans())
def test_group_act_acc_are_the_single_op(case, members: int, act: str, gated: bool) -> None:
    """The list ops with 8-bit weights are the single op per member; act computes its input
    first; acc adds the unrounded float32 outputs."""
    x, q, scale, b, thr, center, cscale = case
    qs = [q] + [quantize(torch.randn_like(q.float()), q.dtype)[0] for _ in range(members - 1)]
    scales = [scale] + [torch.rand(q.shape[0]) * 0.01 for _ in range(members - 1)]
    bs = [b] * members if b is not None else []
    single = [OPS.threshold_linear(x, w, b, thr, center, cscale, None, s)
              for w, s in zip(qs, scales, strict=True)]
    for got, want in zip(OPS.threshold_linear_group(x, qs, bs, thr, center, cscale, [], scales), single,
                         strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)
    m = torch.randn_like(x) if gated else None
    got = OPS.threshold_linear_act(x, m, q, b, thr, center, cscale, None, act, scale)
    want = OPS.threshold_linear(activation_reference(x, act, m), q, b, thr, center, cscale, None, scale)
    torch.testing.assert_close(got, want, equal_nan=True)
    # acc: a float32 x is rounded to the layers' dtype first (given: ``dtype``)
    acc0 = torch.randn(*x.shape[:-1], sum(w.shape[0] for w in qs))
    acc = acc0.clone()
    zeros = OPS.threshold_linear_acc(acc, x.float(), None, qs, bs, thr, center, cscale, [], None, [3], scales,
                                     x.dtype)
    assert zeros.shape == (3,) and not zeros.any()
    xm = torch.where(keep_mask_reference(x, thr, center, cscale), x,
                     0 if center is None else center.to(x.dtype))
    want = torch.cat([F.linear(xm.double(), dequantize(w, s).double(), b.double() if b is not None else None)
                      for w, s in zip(qs, scales, strict=True)], -1)
    assert _rel(acc - acc0, want) < 1e-5


def _opcheck_args(qdtype: torch.dtype, device: str, rows: int = 1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 96, generator=g).to(device, torch.bfloat16)
    qs, scales = zip(*[quantize(torch.randn(40, 96, generator=g), qdtype) for _ in range(2)], strict=True)
    qs = [q.to(device).t().contiguous().t() for q in qs]
    scales = [s.to(device) for s in scales]
    c = (0.1 * torch.randn(96, generator=g)).to(device)
    cbs = [center_bias_value(q, c, s, torch.bfloat16) for q, s in zip(qs, scales, strict=True)]
    b = torch.randn(40, generator=g).to(device, torch.bfloat16)
    return x, qs, scales, c, cbs, b


def run_opchecks(qdtype: torch.dtype, device: str) -> None:
    # test_schema's mutation check multiplies the inputs, which fp8 tensors do not support: fp8
    # runs the other checks (fake impl, autograd registration, AOT dispatch), int8 all of them
    utils = tuple(u for u in ("test_schema", "test_autograd_registration", "test_faketensor",
                              "test_aot_dispatch_dynamic") if qdtype == torch.int8 or u != "test_schema")
    opcheck = lambda op, args: torch.library.opcheck(op, args, test_utils=utils)
    for rows in (1, 2, 3):
        x, qs, scales, c, cbs, b = _opcheck_args(qdtype, device, rows)
        opcheck(OPS.threshold_linear.default, (x, qs[0], b, 0.5, c, None, cbs[0], scales[0]))
        opcheck(OPS.threshold_linear.default, (x.float().requires_grad_(), qs[0], None, 0.3, None,
                                               torch.rand(96, device=device) + 0.5, None, scales[0]))
        opcheck(OPS.threshold_linear_group.default, (x, qs, [b, b], 0.5, c, None, cbs, scales))
        opcheck(OPS.threshold_linear_act.default,
                (x, torch.randn_like(x), qs[0], None, 0.5, c, None, cbs[0], "silu", scales[0]))
        if rows == 1:
            acc = torch.zeros(1, 80, device=device)
            opcheck(OPS.threshold_linear_acc.default,
                    (acc, x.float(), None, qs, [], 0.5, c, None, cbs, None, [5], scales, torch.bfloat16))


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_opcheck(qdtype: torch.dtype) -> None:
    run_opchecks(qdtype, "cpu")


def test_x_gradient_flows_through_the_dequantized_weight() -> None:
    q, scale = quantize(torch.randn(6, 8), torch.int8)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    OPS.threshold_linear(x, q, None, 0.5, None, None, None, scale).square().sum().backward()
    keep = keep_mask_reference(x.detach(), 0.5, None, None)
    x2 = x.detach().clone().requires_grad_()
    (torch.where(keep, x2, 0.0) @ dequantize(q, scale).double().t()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_bad_arguments_are_named() -> None:
    x = torch.randn(1, 8)
    q, scale = quantize(torch.randn(4, 8), torch.int8)
    with pytest.raises(RuntimeError, match="needs its weight_scale"):
        OPS.threshold_linear(x, q, None, 0.5)
    with pytest.raises(RuntimeError, match="weight_scale must be float32 \\(4,\\)"):
        OPS.threshold_linear(x, q, None, 0.5, None, None, None, scale[:3])
    with pytest.raises(RuntimeError, match="weight_scale must be float32"):
        OPS.threshold_linear(x, q, None, 0.5, None, None, None, scale.double())
    with pytest.raises(RuntimeError, match="weight_scale is for 8-bit weights"):
        OPS.threshold_linear(x, q.float(), None, 0.5, None, None, None, scale)
    with pytest.raises(RuntimeError, match="x must be a 16/32/64-bit float"):
        OPS.threshold_linear(x.to(torch.int8), q, None, 0.5, None, None, None, scale)
    with pytest.raises(RuntimeError, match="weight_scales must be None or one per weight"):
        OPS.threshold_linear_group(x, [q, q], [], 0.5, None, None, [], [scale])
    acc = torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match="dtype must be the layers' 16/32-bit activation dtype"):
        OPS.threshold_linear_acc(acc, x, None, [q], [], 0.5, None, None, [], None, [0], [scale], torch.int8)
    with pytest.raises(RuntimeError, match="dtype torch.bfloat16 differs from the weights'"):
        OPS.threshold_linear_acc(acc, x, None, [q.float()], [], 0.5, None, None, [], None, [0], None,
                                 torch.bfloat16)


# -- the kernel through the interpreter -------------------------------------------------------------


@triton.jit
def _dequant_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, sg._dequant(tl.load(w_ptr + offs, mask=offs < n, other=0.0)), mask=offs < n)


@cpu_only
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_tile_conversion_is_exact_cpu(qdtype: torch.dtype) -> None:
    """Every int8 value, and every finite fp8 e4m3 value (subnormals included), to float32
    exactly (int8 by the integer-add trick, not a conversion instruction)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(qdtype)
    if qdtype == torch.float8_e4m3fn:
        codes = codes[codes.float().isfinite()]  # 0x7f / 0xff are NaN; quantized weights never hold it
    out = torch.empty(codes.numel())
    _dequant_kernel[(1,)](codes, out, codes.numel(), BLOCK=256)
    assert torch.equal(out, codes.float())


@dataclasses.dataclass
class QCase:
    base: Case
    qdtype: torch.dtype
    members: int


def qcases(max_rows: int, max_n: int, max_k: int, qdtype=None, center=None):
    return st.builds(QCase, base=cases(max_rows, max_n, max_k, center=center),
                     qdtype=st.sampled_from(QDTYPES) if qdtype is None else st.just(qdtype),
                     members=st.integers(1, 3))


def quantized_members(qc: QCase, device: str):
    """``members`` column-major 8-bit weights (N, N/2, 17 wide), their scales, biases and center
    biases, from ``make_inputs``; and x, center, channel scale."""
    c = qc.base
    x, _, _, center, cscale, _ = make_inputs(c, device)
    ns = [c.n, max(1, c.n // 2), 17][:qc.members]
    qs, scales, bs, cbs = [], [], [], []
    for i, n in enumerate(ns):
        _, w, b, _, _, _ = make_inputs(dataclasses.replace(c, n=n, seed=c.seed + 1 + i), device)
        q, s = quantize(w.t().t(), qc.qdtype)  # keeps w's column-major strides
        qs.append(q)
        scales.append(s * (1 + i))
        bs.append(b)
        cbs.append(None if center is None or not c.center_bias
                   else center_bias_value(q, center, scales[-1], c.dtype))
    return x, qs, scales, bs, cbs, center, cscale


def run_quantized_case(qc: QCase, device: str, config=None) -> None:
    x, qs, scales, bs, cbs, center, cscale = quantized_members(qc, device)
    if not (qs[0].stride(0) == 1 or qs[0].shape[0] == 1):
        qs = [q.t().contiguous().t() for q in qs]
    outs = sg.threshold_gemv_group(x, qs, bs, qc.base.threshold, center, cscale, cbs, config=config,
                                   weight_scales=scales)
    for out, q, s, b in zip(outs, qs, scales, bs, strict=True):
        check(out, x, dequantize(q, s), b, qc.base.threshold, center, cscale, qc.base.dtype)


def _config(qc: QCase, num_sms: int, **kw):
    ns = [qc.base.n, max(1, qc.base.n // 2), 17][:qc.members]
    return sg._pick_config(qc.base.rows, sum(ns), qc.base.k, 1, num_sms, row_kernel=True, num_warps=1,
                           tile_bytes=0, **kw)


@cpu_only
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qc=qcases(max_rows=2, max_n=80, max_k=200), num_sms=st.sampled_from([1, 4]),
       block_n=st.sampled_from([16, 32]), chunk_k=st.sampled_from([16, 64]), sub_k=st.sampled_from([1, 4]),
       stages=st.sampled_from([0, 3]), atomic_epilogue=st.booleans())
def test_kernel_matches_reference_cpu(qc: QCase, num_sms: int, block_n: int, chunk_k: int, sub_k: int,
                                      stages: int, atomic_epilogue: bool) -> None:
    """1-2 rows, 1-3 members of int8 or fp8, over centers, channel scales, biases, splits, tiles,
    weight loops and split-K epilogues; the atomic epilogue leaves its state zero."""
    if qc.base.rows > 1:
        stages, atomic_epilogue = max(stages, 2), True  # what several rows in the stream need
    cfg = _config(qc, num_sms, block_n=block_n, chunk_k=chunk_k, sub_k=sub_k, stages=stages,
                  atomic_epilogue=atomic_epilogue, programs_per_sm=4)
    run_quantized_case(qc, "cpu", cfg)
    assert not sg._split_sums(torch.device("cpu")).any()
    assert not sg._arrival_counters(torch.device("cpu")).any()


def run_quantized_acc_case(qc: QCase, act: str | None, x_f32: bool, device: str, config=None) -> None:
    """Accumulating (one row), optionally through the prologue, x optionally a float32 sum:
    the kernel adds each member's float32 output to ``acc``."""
    if act == "gelu":  # torch's CPU gelu(+inf) is NaN, the formula's inf (test_fuse_act.py)
        qc = dataclasses.replace(qc, base=dataclasses.replace(qc.base, specials=min(qc.base.specials, 1)))
    x, qs, scales, bs, cbs, center, cscale = quantized_members(qc, device)
    dtype = qc.base.dtype
    xm = None
    if act is not None:
        xm = make_inputs(dataclasses.replace(qc.base, seed=qc.base.seed + 7, specials=0), device)[0]
    xin, xmin = (x.float(), None if xm is None else xm.float()) if x_f32 else (x, xm)
    acc0 = torch.randn(*x.shape[:-1], sum(q.shape[0] for q in qs)).to(device)
    acc = acc0.clone()
    zeros = sg.threshold_gemv_group(xin, qs, bs, qc.base.threshold, center, cscale, cbs, config=config,
                                    act=act, x_mul=xmin, accumulate=acc, zeros_next=5, weight_scales=scales,
                                    dtype=dtype)
    assert zeros.shape == (5,) and not zeros.any()
    xr = x if act is None else activation_reference(x, act, xm)
    off = 0
    for q, s, b in zip(qs, scales, bs, strict=True):
        n = q.shape[0]
        want = reference_f64(xr, dequantize(q, s), b, qc.base.threshold, center, cscale)
        got = (acc[..., off:off + n] - acc0[..., off:off + n]).double().cpu()
        want = want.cpu()
        assert torch.equal(got.isnan(), want.isnan())
        fin = want.isfinite()
        assert (got[fin] - want[fin]).norm() <= TOL[dtype] * want[fin].norm() + 1e-6
        off += n


@cpu_only
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qc=qcases(max_rows=1, max_n=80, max_k=200), act=st.sampled_from([None, *sorted(ACTIVATIONS)]),
       x_f32=st.booleans(), chunk_k=st.sampled_from([16, 64]), stages=st.sampled_from([0, 3]))
def test_kernel_accumulates_cpu(qc: QCase, act, x_f32: bool, chunk_k: int, stages: int) -> None:
    cfg = _config(qc, 4, block_n=16, chunk_k=chunk_k, sub_k=4, stages=stages, programs_per_sm=16)
    run_quantized_acc_case(qc, act, x_f32, "cpu", cfg)


@cpu_only
def test_center_bias_follows_the_quantized_weight_cpu() -> None:
    """A folded ``W_deq @ center`` is recomputed when the 8-bit data or its scale change in place."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40, generator=g)
    q, s = quantize(torch.randn(24, 40, generator=g), torch.int8)
    q = q.t().contiguous().t()
    c = torch.tensor(0.3)
    cb = register_center_bias(center_bias_value(q, c, s, torch.float32), q, s)
    for update in (lambda: s.mul_(2), lambda: q.neg_(), None):
        got = sg.threshold_gemv(x, q, None, 0.5, c, None, cb, weight_scale=s)
        want = OPS.threshold_linear(x, q, None, 0.5, c, None, None, s)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if update is not None:
            update()


def test_launch_rules_for_8bit_weights(monkeypatch) -> None:
    """One-row launches stream 4 KB runs whatever the element size (4096 8-bit columns, 16 KB
    tiles); two 8-bit rows take the kernel as two 16-bit rows do; 8-bit weights need a scale."""
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]:
        cfg = sg._pick_config(1, n, k, 1, 132, deterministic=False)
        assert cfg.block_n == 4096 and cfg.sub_k * cfg.block_n == 16384 and cfg.atomic_epilogue
        assert cfg.row_kernel and cfg.stages == 4
    for dt in QDTYPES:
        assert sg.max_rows(4096, 4096, dt) == 2 and sg.max_rows(4096, 4096, dt, 0.4) == 1
    x = torch.randn(1, 8)
    q, s = quantize(torch.randn(4, 8), torch.int8)
    with pytest.raises(RuntimeError, match="weight_scales with torch.float32 weights"):
        sg.threshold_gemv(x, q.float(), None, 0.5, weight_scale=s)
    with pytest.raises(RuntimeError, match="8-bit weights need the one-row kernel"):
        sg.threshold_gemv(x, q, None, 0.5, weight_scale=s,
                          config=sg._pick_config(1, 4, 8, 1, 4, row_kernel=False))
    assert not sg.supports(x, q, weight_scale=s)  # CPU tensors: never the kernel


# -- torchao's tensors ---------------------------------------------------------------------------


def _torchao_linear(config_name: str, device: str = "cpu", n: int = 48, k: int = 64):
    ao = pytest.importorskip("torchao.quantization")
    configs = {
        "int8": lambda: ao.Int8WeightOnlyConfig(),
        "int8_tensor": lambda: ao.Int8WeightOnlyConfig(granularity=ao.PerTensor()),
        "int8_group": lambda: ao.Int8WeightOnlyConfig(granularity=ao.PerGroup(32)),
        "fp8": lambda: ao.Float8WeightOnlyConfig(),
        "fp8_tensor": lambda: ao.Float8WeightOnlyConfig(granularity=ao.PerTensor()),
        "fp8_group": lambda: ao.Float8WeightOnlyConfig(granularity=ao.PerGroup(32)),
        "int8_dynamic": lambda: ao.Int8DynamicActivationInt8WeightConfig(),
    }
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n).to(device, torch.bfloat16)
    ao.quantize_(lin, configs[config_name]())
    return lin


@pytest.mark.parametrize("name, kind", [("int8", "int8"), ("int8_tensor", "int8"), ("fp8", "fp8"),
                                        ("fp8_tensor", "fp8")])
def test_weight_format_reads_torchao(name: str, kind: str) -> None:
    from fxsparse.quantized import weight_format

    lin = _torchao_linear(name)
    fmt = weight_format(lin.weight)
    assert fmt.kind == kind and fmt.quantized and fmt.dtype == torch.bfloat16 and fmt.reason is None
    assert fmt.qdata.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[kind]
    assert fmt.scale.shape == (48,) and fmt.scale.dtype == torch.float32
    assert torch.equal(dequantize(fmt.qdata, fmt.scale), lin.weight.dequantize(torch.float32))
    # the op on what it read is the layer of the dequantized weight, masked
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    got = OPS.threshold_linear(x, fmt.qdata, lin.bias, 0.5, None, None, None, fmt.scale)
    xm = torch.where(x.abs() < 0.5, 0.0, x.float())
    want = F.linear(xm, lin.weight.dequantize(torch.float32), lin.bias.float())
    assert _rel(got, want) < 1e-2


@pytest.mark.parametrize("name, reason", [("int8_group", "one scale per output channel"),
                                          ("fp8_group", "one scale per output channel"),
                                          ("int8_dynamic", "quantizes activations too")])
def test_weight_format_names_what_it_cannot_read(name: str, reason: str) -> None:
    from fxsparse.quantized import to_column_major, weight_format

    lin = _torchao_linear(name)
    fmt = weight_format(lin.weight)
    assert fmt.kind == "unsupported" and reason in fmt.reason and fmt.qdata is None
    assert not to_column_major(lin.weight)


def test_weight_format_of_plain_tensors() -> None:
    from fxsparse.quantized import weight_format

    w = torch.randn(4, 8, dtype=torch.bfloat16)
    fmt = weight_format(torch.nn.Parameter(w))
    assert fmt.kind == "bf16" and not fmt.quantized and fmt.scale is None
    assert weight_format(w.to(torch.int8)).kind == "unsupported"


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_to_column_major_keeps_the_parameter(name: str) -> None:
    from fxsparse.quantized import to_column_major, weight_format

    lin = _torchao_linear(name)
    p = lin.weight
    before = p.dequantize(torch.float32).clone()
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y0 = lin(x)
    assert to_column_major(p) and lin.weight is p
    q = weight_format(p).qdata
    assert q.stride() == (1, 48) and torch.equal(p.dequantize(torch.float32), before)
    assert torch.equal(lin(x), y0)  # torchao's own path takes either layout
    assert not to_column_major(p)  # already done


# -- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("center", ["none", "channel"])
def test_kernel_matches_reference_gpu(qdtype: torch.dtype, center: str) -> None:

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(qc=qcases(max_rows=2, max_n=3000, max_k=3000, qdtype=qdtype, center=center))
    def prop(qc: QCase) -> None:
        run_quantized_case(qc, "cuda")  # the default launch rule

    prop()
    # the decode shapes, alone and as q/k/v and gate/up groups; each launch leaves zero state
    for ns, k in [([14336], 4096), ([4096], 14336), ([4096, 1024, 1024], 4096), ([14336, 14336], 4096)]:
        for rows in (1, 2):
            base = Case(rows, ns[0], k, torch.bfloat16, 0.7, center, True, True, True, "contiguous", 0, k)
            x, _, _, ctr, cscale, _ = make_inputs(base, "cuda")
            ws = [(torch.randn(k, n, device="cuda") * k**-0.5).t() for n in ns]
            qs, scales = zip(*[quantize(w, qdtype) for w in ws], strict=True)
            cbs = [None if ctr is None else center_bias_value(q, ctr, s, torch.bfloat16)
                   for q, s in zip(qs, scales, strict=True)]
            for _ in range(2):
                outs = sg.threshold_gemv_group(x, list(qs), [None] * len(ns), 0.7, ctr, cscale, cbs,
                                               weight_scales=list(scales))
                for out, q, s in zip(outs, qs, scales, strict=True):
                    check(out, x, dequantize(q, s), None, 0.7, ctr, cscale, torch.bfloat16)
    assert not sg._split_sums(torch.device("cuda")).any()
    assert not sg._arrival_counters(torch.device("cuda")).any()



@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_kernel_accumulates_gpu(qdtype: torch.dtype) -> None:

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(qc=qcases(max_rows=1, max_n=3000, max_k=3000, qdtype=qdtype),
           act=st.sampled_from([None, *sorted(ACTIVATIONS)]), x_f32=st.booleans())
    def prop(qc: QCase, act, x_f32: bool) -> None:
        run_quantized_acc_case(qc, act, x_f32, "cuda")

    prop()



@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_ops_on_the_gpu(qdtype: torch.dtype) -> None:
    """opcheck on CUDA (1-2 rows: the kernel; 3: the fallback), and the ops' CUDA paths
    (single, group, act) against their CPU references."""
    run_opchecks(qdtype, "cuda")
    for rows in (1, 2, 3):
        x, qs, scales, c, cbs, b = _opcheck_args(qdtype, "cuda", rows)
        assert sg.supports(x, qs[0], weight_scale=scales[0]) == (rows <= 2)
        cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else [u.cpu() for u in t]
        got = OPS.threshold_linear(x, qs[0], b, 0.5, c, None, cbs[0], scales[0])
        want = OPS.threshold_linear(*map(cpu, (x, qs[0], b)), 0.5, cpu(c), None, None, cpu(scales[0]))
        assert _rel(got.cpu(), want) < 1e-2
        got = OPS.threshold_linear_act(x, x, qs[0], None, 0.5, c, None, cbs[0], "silu", scales[0])
        want = OPS.threshold_linear_act(cpu(x), cpu(x), cpu(qs[0]), None, 0.5, cpu(c), None, None, "silu",
                                        cpu(scales[0]))
        assert _rel(got.cpu(), want) < 1e-2
        for g, w in zip(OPS.threshold_linear_group(x, qs, [], 0.5, c, None, cbs, scales),
                        OPS.threshold_linear_group(cpu(x), cpu(qs), [], 0.5, cpu(c), None, [], cpu(scales)),
                        strict=True):
            assert _rel(g.cpu(), w) < 1e-2



@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_torchao_weights_gpu(name: str) -> None:
    """torchao's own quantized tensors on the GPU, laid out column-major: the kernel runs on
    what ``weight_format`` reads and equals torchao's linear on the masked input."""
    from fxsparse.quantized import to_column_major, weight_format

    lin = _torchao_linear(name, "cuda", 4096, 4096)
    to_column_major(lin.weight)
    fmt = weight_format(lin.weight)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert sg.supports(x, fmt.qdata, weight_scale=fmt.scale)
    got = OPS.threshold_linear(x, fmt.qdata, lin.bias, 0.6, None, None, None, fmt.scale)
    with torch.no_grad():
        want = lin(torch.where(x.abs() < 0.6, 0.0, x))
    assert _rel(got, want) < 2e-2



# -- the backend on a torchao-quantized model (CPU) -------------------------------------------------


def quantized_tiny_llama(config_name: str, dtype: torch.dtype = torch.float32):
    """The calibrated tiny Llama quantized by torchao (scales rounded to powers of two, so the
    dequantized weights are exact in ``dtype``), its dequantized twin, and the plan."""
    import copy

    ao = pytest.importorskip("torchao.quantization")
    from fxsparse.quantized import is_torchao

    from conftest import calibrated_tiny_llama

    model, plan = calibrated_tiny_llama()
    model = model.to(dtype)
    twin = copy.deepcopy(model)
    config = {"int8": ao.Int8WeightOnlyConfig, "fp8": ao.Float8WeightOnlyConfig,
              "int8_group": lambda: ao.Int8WeightOnlyConfig(granularity=ao.PerGroup(16))}[config_name]
    ao.quantize_(model, config())
    twins = dict(twin.named_modules())
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and is_torchao(mod.weight):
            with torch.no_grad():
                mod.weight.scale.copy_(torch.exp2(torch.log2(mod.weight.scale).round()))
            twins[name].weight = torch.nn.Parameter(mod.weight.dequantize(dtype), requires_grad=False)
    return model, twin, plan


@pytest.mark.parametrize("config_name", ["int8", "fp8"])
@pytest.mark.parametrize("inductor", [False, True])
def test_quantized_model_matches_the_dequantized_reference(config_name: str, inductor: bool,
                                                           monkeypatch) -> None:
    """``sparse_act`` on a torchao-quantized tiny Llama equals the eager hooks on its dequantized
    twin: one row through the 8-bit ops (grouped, activation prologue, chained through float32
    accumulators, as on CUDA), five rows through the mask and torchao's own linear."""
    import fxsparse.backend
    from fxsparse.reference import plan_hooks

    monkeypatch.setattr(fxsparse.backend, "ACCUMULATE_DEVICES", ("cuda", "cpu"))

    model, twin, plan = quantized_tiny_llama(config_name)
    record: list = []
    fast = torch.compile(model, backend="sparse_act", options={"plan": plan, "record": record,
                                                                 "dense_when_faster": False,
                                                                 "inductor": inductor})
    for rows in (1, 5):
        x = torch.randint(0, 96, (1, rows), generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            got = fast(x, use_cache=False).logits
            with plan_hooks(twin, plan):
                want = twin(x, use_cache=False).logits
            dense = twin(x, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (dense - want).abs().max() > 1e-3  # the plan changes the output
    decisions = [d for g in record for d in g["decisions"] if d["name"] in plan.layers]
    kind = config_name
    assert {d["weights"] for d in decisions} == {kind}
    ops = {d["op"] for d in decisions}
    assert {"fxsparse.threshold_linear_group", "fxsparse.threshold_linear_act", "mask+linear"} <= ops
    assert any(d.get("accumulate") for d in decisions)
    assert "threshold_linear_acc" in record[0]["stages"]["accumulate"]
    code = record[0]["stages"]["lower"]
    assert "_weight_.qdata" in code and "_weight_.scale" in code  # getattr nodes on the subclass


def test_unreadable_torchao_weights_run_dense_with_the_reason() -> None:
    """Per-group int8 scales: torchao's own path, the decision saying why, and prepare_weights
    leaves the weights alone."""
    import fxsparse

    model, _, plan = quantized_tiny_llama("int8_group")
    assert fxsparse.prepare_weights(model, plan, device_types=("cpu",), dense_when_faster=False) == []
    record: list = []
    options = {"plan": plan, "record": record, "dense_when_faster": False, "inductor": False}
    fast = torch.compile(model, backend="sparse_act", options=options)
    x = torch.randint(0, 96, (1, 1))
    with torch.no_grad():
        got = fast(x, use_cache=False).logits
        want = model(x, use_cache=False).logits
    torch.testing.assert_close(got, want)
    decisions = [d for g in record for d in g["decisions"] if d["name"] in plan.layers]
    assert decisions and all(d["op"] == "linear" and "one scale per output channel" in d["reason"]
                             for d in decisions)


def test_prepare_weights_lays_out_torchao_data() -> None:
    """``prepare_weights`` makes each planned 8-bit weight's data column-major in place (same
    Parameter objects), and the compiled model still matches (one row: on CPU, Inductor lowers
    torchao's own int8 path to ``_weight_int8pack_mm``, which rejects column-major data)."""
    import fxsparse
    from fxsparse.quantized import weight_format
    from fxsparse.reference import plan_hooks

    model, twin, plan = quantized_tiny_llama("int8")
    params = {n: m.weight for n, m in model.named_modules() if n in plan.layers}
    done = fxsparse.prepare_weights(model, plan, device_types=("cpu",), dense_when_faster=False)
    assert sorted(done) == sorted(plan.layers)
    for name, p in params.items():
        mod = dict(model.named_modules())[name]
        q = weight_format(mod.weight).qdata
        assert mod.weight is p and q.stride() == (1, q.shape[0])
    x = torch.randint(0, 96, (1, 1))
    with torch.no_grad(), plan_hooks(twin, plan):
        want = twin(x, use_cache=False).logits
    for inductor in (False, True):  # one row: the 8-bit ops read the column-major data (AOTAutograd
        torch.compiler.reset()      # flattens the subclass, the getattr nodes pick its data)
        fast = torch.compile(model, backend="sparse_act",
                             options={"plan": plan, "dense_when_faster": False, "inductor": inductor})
        with torch.no_grad():
            got = fast(x, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config_name", ["int8", "fp8"])
def test_quantized_model_gpu(config_name: str) -> None:
    """The quantized tiny Llama in bf16 on the GPU, weights prepared (column-major 8-bit data),
    compiled by ``sparse_act`` through Inductor: one row runs the 8-bit kernel (grouped,
    prologue, float32 accumulation), five rows the fused mask and torchao's linear on the
    column-major data; both near the eager hooks on the dequantized twin."""
    import fxsparse
    from fxsparse.reference import plan_hooks

    model, twin, plan = quantized_tiny_llama(config_name, torch.bfloat16)
    model, twin = model.cuda(), twin.cuda()
    assert sorted(fxsparse.prepare_weights(model, plan, dense_when_faster=False)) == sorted(plan.layers)
    record: list = []
    fast = torch.compile(model, backend="sparse_act",
                         options={"plan": plan, "record": record, "dense_when_faster": False})
    for rows in (1, 5):
        x = torch.randint(0, 96, (1, rows), generator=torch.Generator().manual_seed(rows)).cuda()
        with torch.no_grad():
            got = fast(x, use_cache=False).logits.float()
            with plan_hooks(twin, plan):
                want = twin(x, use_cache=False).logits.float()
        assert _rel(got, want) < 3e-2  # bf16, Inductor's rounding: a few masks may flip
    decisions = [d for g in record for d in g["decisions"] if d["name"] in plan.layers]
    assert {d["weights"] for d in decisions} == {config_name}
    assert any(d.get("accumulate") for d in decisions)
    assert "mask+linear" in {d["op"] for d in decisions}
