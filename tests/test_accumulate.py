"""``threshold_linear_acc`` (float32 outputs, split-K atomics): op, kernel mode and the pass."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sparse_gemv import HAS_CUDA, INTERPRETED, TOL, Case, cases, cpu_only, make_inputs, reference_f64

import fxsparse
import fxsparse.backend
from fxsparse.kernels import sparse_gemv as sg
from fxsparse.kernels.threshold_linear import ACTIVATIONS, activation_reference
from fxsparse.reference import plan_hooks

op = torch.ops.fxsparse.threshold_linear_acc.default
ACTS = [None, *sorted(ACTIVATIONS)]


def _compare(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """float64 ``want``: NaN and Inf where it has them, the rest within ``tol`` (relative norm)."""
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), "NaN positions differ from the reference"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]), "Inf positions differ from the reference"
    fin = want.isfinite()
    err, norm = (got[fin] - want[fin]).norm(), want[fin].norm()
    assert err <= tol * norm, f"relative error {float(err / norm):.2e}"


def run_acc_case(c: Case, ns: list[int], act: str | None, gated: bool, x_f32: bool, device: str,
                 config=None) -> None:
    """The kernel adds each member's output to a float32 ``acc`` that already holds values, and
    writes the next call's zeros into memory that held NaN."""
    if act == "gelu":  # torch's CPU gelu(+inf) is NaN, the formula's inf (test_fuse_act.py)
        c = dataclasses.replace(c, specials=min(c.specials, 1))
    x, _, _, center, scale, _ = make_inputs(c, device)
    xm = None
    if gated and act:
        xm = make_inputs(dataclasses.replace(c, seed=c.seed + 7, specials=0), device)[0]
    members = [make_inputs(dataclasses.replace(c, n=n, seed=c.seed + 1 + i), device)
               for i, n in enumerate(ns)]
    weights, biases = [m[1] for m in members], [m[2] for m in members]
    cbs = [None if center is None or not c.center_bias else w.float() @ center.to(c.dtype).float().expand(c.k)
           for w in weights]
    if x_f32:  # another call's float32 sum: values between the dtype's, rounded in the kernel
        g = torch.Generator().manual_seed(c.seed)
        bump = lambda t: None if t is None else t.float() * (1 + 1e-3 * torch.rand(t.shape, generator=g)
                                                             .to(device))
        x, xm = bump(x), bump(xm)
    acc0 = torch.randn(*x.shape[:-1], sum(ns), generator=torch.Generator().manual_seed(c.seed)).to(device)
    acc = acc0.clone()
    zeros_next = c.seed % 50
    real = sg._uninitialised
    sg._uninitialised = lambda n, dev: torch.full((n,), math.nan, device=dev)
    try:
        zeros = sg.threshold_gemv_group(x, weights, biases, c.threshold, center, scale, cbs, config=config,
                                        act=act, x_mul=xm, accumulate=acc, zeros_next=zeros_next)
    finally:
        sg._uninitialised = real
    assert zeros.shape == (zeros_next,) and zeros.dtype == torch.float32 and not zeros.any()
    xr = x.to(c.dtype)
    if act is not None:
        xr = activation_reference(xr, act, None if xm is None else xm.to(c.dtype))
    offset = 0
    for w, b in zip(weights, biases, strict=True):
        n = w.shape[0]
        want = reference_f64(xr, w, b, c.threshold, center, scale)
        _compare(acc[..., offset:offset + n] - acc0[..., offset:offset + n], want, TOL[c.dtype])
        offset += n


# -- the kernel's accumulating mode, through the interpreter --------------------------------------


@cpu_only
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases(max_rows=1, max_n=90, max_k=300), members=st.integers(1, 3), act=st.sampled_from(ACTS),
       gated=st.booleans(), x_f32=st.booleans(), chunk_k=st.sampled_from([16, 64]),
       stages=st.sampled_from([0, 3]))
def test_kernel_accumulates_cpu(c: Case, members: int, act, gated: bool, x_f32: bool, chunk_k: int,
                                stages: int) -> None:
    ns = [c.n, max(1, c.n // 3), 17][:members]
    cfg = sg._pick_config(1, sum(ns), c.k, c.dtype.itemsize, 4, block_n=16, chunk_k=chunk_k,
                          programs_per_sm=16, tile_bytes=0, sub_k=8, stages=stages)
    assert cfg.row_kernel and (cfg.split_k > 1 or c.k <= chunk_k)
    run_acc_case(c, ns, act, gated, x_f32, "cpu", cfg)


def test_accumulating_launches_take_the_stream_rule() -> None:
    """Accumulating launches are never deterministic, so they take the stream rule whatever
    ``torch.use_deterministic_algorithms`` says (the backend skips the pass under it instead)."""
    for n, k in [(4096, 4096), (6144, 4096), (4096, 14336), (14336, 4096), (28672, 4096)]:
        for deterministic in (False, True):
            acc = sg._pick_config(1, n, k, 2, 132, accumulate=True, deterministic=deterministic)
            assert acc == sg._pick_config(1, n, k, 2, 132, deterministic=False, programs_per_sm=2)
            assert acc.num_warps == 8 and acc.stages > 0 and acc.atomic_epilogue
    assert sg._pick_config(1, 4096, 4096, 2, 132, accumulate=True, sub_k=16).sub_k == 16  # overrides win


def test_kernel_refuses_what_it_cannot_accumulate() -> None:
    x, w = torch.randn(2, 8), torch.randn(8, 4).t()
    with pytest.raises(RuntimeError, match="accumulate must be a contiguous float32"):
        sg.threshold_gemv_group(x[:1], [w], [None], 0.5, accumulate=torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="one row"):
        sg.threshold_gemv_group(x, [w], [None], 0.5, accumulate=torch.zeros(2, 4))


# -- the op: reference, fake impl (opcheck), errors -----------------------------------------------


@settings(max_examples=40, deadline=None)
@given(act=st.sampled_from(ACTS), gated=st.booleans(), lead=st.sampled_from([(1,), (3,), (2, 1)]),
       k=st.integers(1, 40), ns=st.lists(st.integers(1, 20), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), x_f32=st.booleans(), bias=st.booleans(),
       thr=st.sampled_from([0.0, 0.3, math.inf]), center=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_op_adds_the_unrounded_outputs(act, gated, lead, k, ns, dtype, x_f32, bias, thr, center,
                                       seed) -> None:
    g = torch.Generator().manual_seed(seed)
    xdt = torch.float32 if x_f32 else dtype
    x = torch.randn(*lead, 2 * k, generator=g).to(xdt)[..., ::2]  # non-contiguous
    xm = torch.randn(*lead, k, generator=g).to(xdt) if gated and act else None
    ws = [torch.randn(n, k, generator=g).to(dtype) for n in ns]
    bs = [torch.randn(n, generator=g).to(dtype) for n in ns] if bias else []
    c = 0.1 * torch.randn(k, generator=g) if center else None
    acc = torch.randn(*lead, sum(ns), generator=g)
    want = acc.double().clone()
    zeros = op(acc, x, xm, ws, bs, thr, c, None, [], act, [2, 3])
    assert zeros.shape == (2, 3) and not zeros.any()
    # independently: round x like the ``to`` it replaces, eager's activation, then float64 linears
    xr = x.to(dtype)
    if act is not None:
        xr = ACTIVATIONS[act](xr) * (xm.to(dtype) if xm is not None else 1)
    keep = ~((xr.double() - (0 if c is None else c.to(dtype).double())).abs() < thr)
    xk = torch.where(keep, xr.double(), 0.0 if c is None else c.to(dtype).double())
    want += torch.cat([F.linear(xk, w.double(), bs[i].double() if bs else None)
                       for i, w in enumerate(ws)], -1)
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device: str) -> None:
    if device == "cuda" and (not HAS_CUDA or INTERPRETED):
        pytest.skip("needs CUDA and TRITON_INTERPRET=0")
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    for rows, act, x_dtype, members in [(1, "silu", torch.float32, 1), (1, None, bf, 3), (3, "relu", bf, 2)]:
        x = torch.randn(rows, 96, generator=g).to(device, x_dtype)
        xm = torch.randn(rows, 96, generator=g).to(device, x_dtype) if act == "silu" else None
        ws = [torch.randn(96, 40, generator=g).to(device, bf).t() for _ in range(members)]  # column-major
        c = (0.1 * torch.randn(96, generator=g)).to(device)
        cbs = [w.float() @ c.to(bf).float() for w in ws]
        acc = torch.zeros(rows, 40 * members, device=device)
        torch.library.opcheck(op, (acc, x, xm, ws, [], 0.5, c, None, cbs, act, [7]))


def test_bad_arguments_are_named() -> None:
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="acc must be float32 of shape"):
        op(torch.zeros(1, 5), x, None, [w], [], 0.5, None, None, [], None, [0])
    with pytest.raises(RuntimeError, match="x must be in the weights' dtype"):
        op(torch.zeros(1, 4), x.double(), None, [w], [], 0.5, None, None, [], None, [0])
    with pytest.raises(RuntimeError, match="x_mul without act"):
        op(torch.zeros(1, 4), x, x, [w], [], 0.5, None, None, [], None, [0])
    with pytest.raises(RuntimeError, match="unknown activation"):
        op(torch.zeros(1, 4), x, None, [w], [], 0.5, None, None, [], "tanh", [0])


# -- the pass -------------------------------------------------------------------------------------


@pytest.fixture
def on_cpu(monkeypatch):
    """The backend rewrites CPU graphs too (by default only CUDA ones, where the kernel gains)."""
    monkeypatch.setattr(fxsparse.backend, "ACCUMULATE_DEVICES", ("cuda", "cpu"))


def _compiled(model, plan, x, **options):
    record = []
    fast = torch.compile(model, backend="sparse_act", options={"plan": plan, "record": record, **options})
    with torch.no_grad():
        out = fast(x, use_cache=False).logits
    return out, record


@pytest.mark.parametrize("inductor", [False, True])
def test_decode_step_chains_float32_outputs(on_cpu, inductor: bool) -> None:
    from conftest import calibrated_tiny_llama

    model, plan = calibrated_tiny_llama()
    model = model.to(torch.bfloat16)
    x = torch.randint(0, 96, (1, 1))
    # Inductor rounds its own fused intermediates as eager only with this option (2.5% off
    # without it, with or without this pass); with it the step equals eager
    with torch._inductor.config.patch(emulate_precision_casts=True):
        got, record = _compiled(model, plan, x, inductor=inductor)
    with torch.no_grad(), plan_hooks(model, plan):
        want = model(x, use_cache=False).logits
    assert (got.float() - want.float()).norm() / want.float().norm() < 1e-3
    decisions = [d for g in record for d in g["decisions"] if d["op"] != "linear"]
    assert len(decisions) == 14 and all(d.get("accumulate") for d in decisions)
    code = record[0]["stages"]["accumulate"]
    assert code.count("threshold_linear_acc.default") == 8  # q/k/v, o, gate/up, down per layer
    assert code.count("torch.zeros") == 1  # each call writes the next one's zeros
    # the down projections read gate/up's float32 sums (rounded in the op), not a rounded copy
    downs = [line for line in code.splitlines() if "'silu'" in line or ", silu" in line]
    downs = [line.split("threshold_linear_acc.default(")[1].split(", ")[1:3] for line in downs
             if "threshold_linear_acc.default(" in line]
    assert len(downs) == 2 and all(a.startswith("narrow") and m.startswith("narrow") for a, m in downs), downs


def test_float32_model_is_unchanged_bit_for_bit(on_cpu) -> None:
    from conftest import calibrated_tiny_llama

    model, plan = calibrated_tiny_llama()
    x = torch.randint(0, 96, (1, 1))
    got, _ = _compiled(model, plan, x, inductor=False)
    torch.compiler.reset()
    plain, _ = _compiled(model, plan, x, inductor=False, accumulate=False)
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)


def test_left_alone(on_cpu) -> None:
    from conftest import calibrated_tiny_llama

    model, plan = calibrated_tiny_llama()
    one = torch.randint(0, 96, (1, 1))

    def accumulated(x, **options) -> int:
        torch.compiler.reset()
        _, record = _compiled(model, plan, x, inductor=False, **options)
        return sum(bool(d.get("accumulate")) for g in record for d in g["decisions"])

    assert accumulated(one) == 14
    assert accumulated(one, accumulate=False) == 0
    assert accumulated(torch.randint(0, 96, (1, 3))) == 0  # several rows: mask+linear
    torch.use_deterministic_algorithms(True)
    try:
        assert accumulated(one) == 0  # atomics add in a varying order
    finally:
        torch.use_deterministic_algorithms(False)
    torch.compiler.reset()
    record = []
    fast = torch.compile(model, backend="sparse_act",
                         options={"plan": plan, "record": record, "inductor": False})
    fast(one, use_cache=False).logits.sum().backward()  # grad mode: the op has no autograd formula
    assert not any(d.get("accumulate") for g in record for d in g["decisions"])


def test_cpu_graphs_are_left_alone_by_default() -> None:
    from conftest import calibrated_tiny_llama

    model, plan = calibrated_tiny_llama()
    _, record = _compiled(model, plan, torch.randint(0, 96, (1, 1)), inductor=False)
    assert not any(d.get("accumulate") for g in record for d in g["decisions"])


# -- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
def test_kernel_accumulates_gpu() -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(c=cases(max_rows=1, max_n=3000, max_k=3000), members=st.integers(1, 3), act=st.sampled_from(ACTS),
           gated=st.booleans(), x_f32=st.booleans())
    def prop(c: Case, members: int, act, gated: bool, x_f32: bool) -> None:
        run_acc_case(c, [c.n, max(1, c.n // 4), 1024][:members], act, gated, x_f32, "cuda")

    prop()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
def test_inductor_decode_accumulates_gpu() -> None:
    """Compiled through Inductor on the GPU (defaults), a one-token Llama step equals the hooks."""
    from conftest import gpu_decode_step

    got, want, decisions = gpu_decode_step()
    assert all(d.get("accumulate") for d in decisions if d["op"] != "linear")
    assert (got - want).norm() / want.norm() < 2e-2


def test_one_chain_per_device() -> None:
    """Calls on two devices in one graph (a model split over GPUs): each device's calls chain
    from their own zeros, never through the other device's."""
    from torch import fx

    from fxsparse.passes import accumulate_outputs

    tl_op = torch.ops.fxsparse.threshold_linear.default
    graph = fx.Graph()
    x0, w0, x1, w1 = (graph.placeholder(n) for n in ("x0", "w0", "x1", "w1"))
    y0 = graph.call_function(tl_op, (x0, w0, None, 0.5, None, None, None))
    y1 = graph.call_function(tl_op, (x1, w1, None, 0.5, None, None, None))
    graph.output((y0, y1))
    for node, shape, device in [(x0, (1, 8), "cpu"), (w0, (4, 8), "cpu"), (y0, (1, 4), "cpu"),
                                (x1, (1, 8), "meta"), (w1, (6, 8), "meta"), (y1, (1, 6), "meta")]:
        node.meta["val"] = torch.empty(shape, device=device)
    gm = accumulate_outputs(fx.GraphModule(torch.nn.Module(), graph), devices=("cpu", "meta"))
    zeros = [n for n in gm.graph.nodes if n.target is torch.zeros]
    assert [(z.args[0], z.kwargs["device"].type) for z in zeros] == [((1, 4), "cpu"), ((1, 6), "meta")]
    accs = [n for n in gm.graph.nodes if n.target is op]
    assert [a.args[0] for a in accs] == zeros and [a.args[-1] for a in accs] == [[0], [0]]
