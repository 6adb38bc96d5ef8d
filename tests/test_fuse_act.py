"""``threshold_linear_act`` (a sparse layer of ``act(a) * b``): op, kernel prologue and the pass."""

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
from test_architectures import ARCHS
from test_sparse_gemv import HAS_CUDA, INTERPRETED, Case, cases, check, cpu_only, make_inputs
from torch import nn

import fxsparse
from fxsparse import IgnoredScope, TargetScope
from fxsparse.kernels import sparse_gemv as sg
from fxsparse.kernels.threshold_linear import ACTIVATIONS, activation_reference, threshold_linear_reference
from fxsparse.reference import plan_hooks

op = torch.ops.fxsparse.threshold_linear_act.default
ACTS = sorted(ACTIVATIONS)


def act_inputs(c: Case, act: str, gated: bool, device: str):
    """``make_inputs`` plus the multiplier b (same shape and layout as a). torch's CPU gelu
    returns NaN at +inf where the formula (and CUDA) give inf: gelu cases plant NaN only."""
    if act == "gelu":
        c = dataclasses.replace(c, specials=min(c.specials, 1))
    a, weight, bias, center, scale, cb = make_inputs(c, device)
    b = make_inputs(dataclasses.replace(c, seed=c.seed + 1, specials=0), device)[0] if gated else None
    return a, b, weight, bias, center, scale, cb


def run_act_case(c: Case, act: str, gated: bool, device: str, config=None) -> None:
    a, b, weight, bias, center, scale, cb = act_inputs(c, act, gated, device)
    (out,) = sg.threshold_gemv_group(a, [weight], [bias], c.threshold, center, scale, [cb], config=config,
                                     act=act, x_mul=b)
    check(out, activation_reference(a, act, b), weight, bias, c.threshold, center, scale, c.dtype)


# -- the kernel's prologue, through the interpreter -----------------------------------------------


@cpu_only
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases(max_rows=1, max_n=100, max_k=300), act=st.sampled_from(ACTS), gated=st.booleans(),
       chunk_k=st.sampled_from([16, 64]), one_step_max=st.sampled_from([0, 512]))
def test_prologue_matches_reference_cpu(c: Case, act: str, gated: bool, chunk_k: int,
                                        one_step_max: int) -> None:
    """One row: the kernel computes act(a) * b as it loads it (one or several masking steps)."""
    cfg = sg._pick_config(1, c.n, c.k, c.dtype.itemsize, 4, block_n=16, chunk_k=chunk_k,
                          one_step_max=one_step_max)
    assert cfg.row_kernel
    run_act_case(c, act, gated, "cpu", cfg)


@cpu_only
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases(max_rows=sg.MAX_ROW_KERNEL_ROWS, max_n=60, max_k=200), act=st.sampled_from(ACTS),
       gated=st.booleans())
def test_prologue_several_rows_cpu(c: Case, act: str, gated: bool) -> None:
    """Several rows in the one-row kernel: act(a) * b computed per row as it is loaded."""
    cfg = sg._pick_config(c.rows, c.n, c.k, c.dtype.itemsize, 4, row_kernel=True, num_warps=1, block_n=16,
                          chunk_k=32, tile_bytes=0, programs_per_sm=4)
    assert cfg.row_kernel
    run_act_case(c, act, gated, "cpu", cfg)


@cpu_only
@pytest.mark.parametrize("act", ACTS)
def test_prologue_rounds_like_eager_cpu(act: str) -> None:
    """Identity weight, nothing dropped: the output is the kernel's input, which must equal
    eager's act(a) * b in bf16/fp16 (each op rounded) bit for bit."""
    k = 384
    g = torch.Generator().manual_seed(3)
    eye = torch.eye(k)
    for dtype in (torch.bfloat16, torch.float16):
        a = (3 * torch.randn(1, k, generator=g)).to(dtype)
        b = torch.randn(1, k, generator=g).to(dtype)
        cfg = sg._pick_config(1, k, k, 2, 4, block_n=64, chunk_k=128)
        (out,) = sg.threshold_gemv_group(a, [eye.to(dtype).t()], [None], 0.0, config=cfg, act=act, x_mul=b)
        want = activation_reference(a, act, b)
        # silu and relu match exactly; erf and the tanh form may differ from torch's CPU kernels
        # in the last float32 bit, which moves a 16-bit rounding now and then
        assert (out != want).float().mean() <= (0.0 if act in ("silu", "relu") else 0.1), act


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, sg._round_to(v, tl.bfloat16), mask=offs < n)


@cpu_only
def test_bf16_rounding_keeps_every_nan_cpu() -> None:
    """GPU arithmetic makes the canonical NaN 0x7FFFFFFF, whose rounding carry would reach the
    sign bit (-0.0): the prologue's NaN must stay NaN (found on the H200)."""
    bits = torch.tensor([0x7FFFFFFF, 0x7FC00000, -1, 0x3F808000, 0x3F818000], dtype=torch.int32)
    x = bits.view(torch.float32)
    out = torch.empty_like(x)
    _round_kernel[(1,)](x, out, x.numel(), BLOCK=8)
    assert out[:3].isnan().all()
    assert torch.equal(out[3:], x[3:].bfloat16().float())  # ties to even: 1.00390625 -> 1, 1.01171875 up


@cpu_only
def test_row_generic_kernel_materialises_the_input_cpu() -> None:
    """Configs of the row-generic kernel (no prologue) compute act(a) * b first: same function."""
    c = Case(1, 40, 90, torch.float32, 0.3, "channel", True, True, True, "strided", 0, 11)
    cfg = sg._pick_config(1, 40, 90, 4, 4, block_n=16, chunk_k=32, row_kernel=False)
    assert not cfg.row_kernel
    run_act_case(c, "silu", True, "cpu", cfg)


def test_bad_arguments_are_named() -> None:
    a, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        op(a, None, w, None, 0.5, None, None, None, "tanh")
    with pytest.raises(RuntimeError, match="b must match a"):
        op(a, torch.randn(1, 7), w, None, 0.5, None, None, None, "silu")
    with pytest.raises(RuntimeError, match="x_mul without act"):
        sg.threshold_gemv_group(a, [w.t().contiguous().t()], [None], 0.5, x_mul=a)


# -- the op: reference, fake impl (opcheck) --------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(act=st.sampled_from(ACTS), gated=st.booleans(), lead=st.sampled_from([(1,), (3,), (2, 1)]),
       k=st.integers(1, 40), n=st.integers(1, 24), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       thr=st.sampled_from([0.0, 0.3, math.inf]), center=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_op_is_threshold_linear_of_the_activation(act, gated, lead, k, n, dtype, thr, center, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*lead, 2 * k, generator=g).to(dtype)[..., ::2]  # non-contiguous
    b = torch.randn(*lead, k, generator=g).to(dtype) if gated else None
    w = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    c = 0.1 * torch.randn(k, generator=g) if center else None
    got = op(a, b, w, bias, thr, c, None, None, act)
    x = ACTIVATIONS[act](a) * (b if gated else 1)  # eager, independently written
    want = threshold_linear_reference(x.to(dtype), w, bias, thr, c)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device: str) -> None:
    if device == "cuda" and (not HAS_CUDA or INTERPRETED):
        pytest.skip("needs CUDA and TRITON_INTERPRET=0")
    g = torch.Generator().manual_seed(0)
    for rows, gated, act in [(1, True, "silu"), (1, False, "relu"), (3, True, "gelu_tanh")]:
        a = torch.randn(rows, 96, generator=g).to(device, torch.bfloat16)
        b = torch.randn(rows, 96, generator=g).to(device, torch.bfloat16) if gated else None
        w = torch.randn(96, 64, generator=g).to(device, torch.bfloat16).t()  # column-major
        c = (0.1 * torch.randn(96, generator=g)).to(device)
        cb = w.float() @ c.to(torch.bfloat16).float()
        torch.library.opcheck(op, (a, b, w, None, 0.5, c, None, cb, act))


# -- the pass -------------------------------------------------------------------------------------


def _plan(model, data, patterns=(r".*",), ignored=()):
    return fxsparse.calibrate(model, data, {TargetScope(patterns=list(patterns)): 0.5},
                              IgnoredScope(names=list(ignored)), progress=False)


def _decisions(model, plan, x, **options) -> tuple[dict, torch.Tensor]:
    record = []
    fast = torch.compile(model, backend="sparse_act",
                         options={"plan": plan, "record": record, "inductor": False, **options})
    with torch.no_grad():
        out = fast(x)
    return {d["name"]: d for g in record for d in g["decisions"]}, out


@pytest.mark.parametrize("arch,site,prologue", [
    ("llama", "mlp.down_proj", "silu(a) * b"),
    ("gemma3", "mlp.down_proj", "gelu_tanh(a) * b"),
    ("phi3", "mlp.down_proj", "silu(a) * b"),  # up * silu(gate), from one fused gate_up_proj
    ("opt", "fc2", "relu(a)"),
    ("gpt2", "mlp.c_proj", None),  # gelu_new is written out as tanh arithmetic: not matched
])
def test_down_projections_compute_their_input(arch: str, site: str, prologue: str | None) -> None:
    cfg_cls, model_cls, kw = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw)).eval()
    g = torch.Generator().manual_seed(1)
    plan = _plan(model, [torch.randint(2, 80, (2, 16), generator=g) for _ in range(2)],
                 [r".*\.(layers|h)\..*"], ["lm_head"])
    x = torch.randint(2, 80, (1, 1), generator=g)
    decisions, got = _decisions(model, plan, x)
    d = next(d for name, d in decisions.items() if name.endswith(site))
    assert d.get("prologue") == prologue
    assert d["op"] == ("fxsparse.threshold_linear_act" if prologue else "fxsparse.threshold_linear")
    with torch.no_grad(), plan_hooks(model, plan):
        want = model(x)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_two_bf16_rows_compute_their_input() -> None:
    """Two rows of a 16-bit layer run the fused kernel (``sparse_gemv.max_rows``), so its input
    is computed in the kernel too; the result is the eager hooks'."""
    torch.manual_seed(0)
    mlp = _MLP().to(torch.bfloat16).eval()
    plan = _plan(mlp, [torch.randn(4, 16, dtype=torch.bfloat16) for _ in range(2)])
    two = torch.randn(2, 16, dtype=torch.bfloat16)
    fused, out = _decisions(mlp, plan, two)
    assert fused["down"]["op"] == "fxsparse.threshold_linear_act"
    assert fused["down"]["prologue"] == "silu(a) * b"
    with torch.no_grad(), plan_hooks(mlp, plan):
        torch.testing.assert_close(out, mlp(two), rtol=0, atol=0)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x, leak: bool = False):
        h = F.silu(self.gate(x))
        y = self.down(h * self.up(x))
        return (y, h) if leak else y


def test_not_fused_where_the_input_is_needed_or_not_one_row() -> None:
    torch.manual_seed(0)
    mlp = _MLP().eval()
    plan = _plan(mlp, [torch.randn(4, 16) for _ in range(2)])
    one = torch.randn(1, 16)
    fused, out = _decisions(mlp, plan, one)
    assert fused["down"]["op"] == "fxsparse.threshold_linear_act"
    with torch.no_grad(), plan_hooks(mlp, plan):
        torch.testing.assert_close(out, mlp(one))
    torch.compiler.reset()
    assert "prologue" not in _decisions(lambda x: mlp(x, leak=True), plan, one)[0]["down"]  # h is an output
    torch.compiler.reset()
    assert "prologue" not in _decisions(mlp, plan, torch.randn(3, 16))[0]["down"]  # mask+linear
    torch.compiler.reset()
    assert "prologue" not in _decisions(mlp, plan, torch.randn(2, 16))[0]["down"]  # float32: one row
    torch.compiler.reset()
    assert "prologue" not in _decisions(mlp, plan, one, fuse_activations=False)[0]["down"]
    torch.compiler.reset()
    record = []
    fast = torch.compile(mlp, backend="sparse_act",
                         options={"plan": plan, "record": record, "inductor": False})
    fast(one).sum().backward()  # grad mode: the op has no autograd formula, so no fusion
    assert all("prologue" not in d for g in record for d in g["decisions"])


# -- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("act", ACTS)
def test_prologue_matches_reference_gpu(act: str) -> None:
    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(c=cases(max_rows=2, max_n=3000, max_k=3000), gated=st.booleans())  # the op's dispatch
    def prop(c: Case, gated: bool) -> None:
        run_act_case(c, act, gated, "cuda")

    prop()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
def test_inductor_decode_with_prologue_gpu() -> None:
    """Compiled through Inductor on the GPU, a one-token Llama step equals the eager hooks."""
    from conftest import gpu_decode_step

    got, want, decisions = gpu_decode_step()
    assert any(d.get("prologue") == "silu(a) * b" for d in decisions)
    assert (got - want).norm() / want.norm() < 2e-2


def test_in_place_write_after_the_activation_is_respected():
    """``act(a) * b`` is recomputed at the layer only if nothing writes ``a`` in place between."""
    from torch import nn

    from fxsparse import LayerPlan, SparsityPlan
    from fxsparse.reference import plan_hooks

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down_proj = nn.Linear(16, 8)

        def forward(self, g, u):
            g = g * 1.0
            h = F.silu(g) * u
            g.add_(5.0)  # after h was computed from it
            return self.down_proj(h), g

    torch.manual_seed(0)
    m = MLP().eval()
    plan = SparsityPlan(layers={"down_proj": LayerPlan(threshold=0.3, in_features=16, out_features=8,
                                                       target_sparsity=0.5)},
                        model=SparsityPlan.fingerprint(m))
    g, u = torch.randn(1, 16), torch.randn(1, 16)
    with torch.no_grad():
        with plan_hooks(m, plan):
            want = m(g.clone(), u)
        torch._dynamo.reset()
        got = torch.compile(m, backend="sparse_act", options={"plan": plan, "inductor": False})(g.clone(), u)
    torch.testing.assert_close(got[0], want[0])
