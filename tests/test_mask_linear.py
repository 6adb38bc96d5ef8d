"""Sites whose every call has more rows than the fused kernel takes: the mask as aten ops + linear."""

import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from fxsparse import LayerPlan, SparsityPlan
from fxsparse.inspection import _kernel_description
from fxsparse.kernels import sparse_gemv
from fxsparse.kernels.threshold_linear import drop_score, keep_mask_reference, threshold_linear_reference
from fxsparse.passes import group_siblings, lower_linears, match_linears

K, N, THRESHOLD = 12, 6, 0.5
single = torch.ops.fxsparse.threshold_linear.default
# exact in bf16, so that entries can sit exactly on the threshold: |x - c| * s == 0.5
CENTERS = {None: None, "scalar": 0.25, "vector": [0.25 * ((i % 3) - 1) for i in range(K)]}
SCALES = {None: None, "vector": [(1.0, 2.0, 0.5)[i % 3] for i in range(K)]}


def _lp(center=None, scale=None, threshold=THRESHOLD, k=K, n=N) -> LayerPlan:
    return LayerPlan(threshold=threshold, in_features=k, out_features=n,
                     center=0.0 if center is None else center, channel_scale=scale)


def _tensors(center, scale):
    return (None if center is None else torch.tensor(center, dtype=torch.float32),
            None if scale is None else torch.tensor(scale, dtype=torch.float32))


def _input(lead, dtype, center, scale) -> torch.Tensor:
    """Random entries; NaN and +-Inf (row 0); every entry exactly on the threshold, on either side
    of the center (row 1: kept); every entry just inside it (row 2: dropped)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    flat = x.view(-1, K)
    c = [0.0] * K if center is None else (center if isinstance(center, list) else [center] * K)
    s = [1.0] * K if scale is None else scale
    flat[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    for j in range(K):
        side = 1 if j % 2 else -1
        flat[1, j] = c[j] + side * THRESHOLD / s[j]
        flat[2, j] = c[j] + side * (1 - 2**-6) * THRESHOLD / s[j]
    ct, st = _tensors(center, scale)
    assert torch.equal(drop_score(flat[1], ct, st), torch.full((K,), THRESHOLD))  # the data is right
    assert not keep_mask_reference(flat[2], THRESHOLD, ct, st).any()
    return x


def _reference(lin: nn.Linear, x, center, scale):
    return threshold_linear_reference(x, lin.weight, lin.bias, THRESHOLD, *_tensors(center, scale))


def _compile(m, plan: SparsityPlan, **kw):
    record = []
    fast = torch.compile(m, backend="sparse_act", options={"plan": plan, "record": record, **kw})
    return fast, record


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("center", list(CENTERS))
@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("lead", [(4,), (2, 3)])
def test_static_multi_row_input_is_mask_plus_linear_and_exact(dtype, center, scale, lead):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(K, N, dtype=dtype)).eval()
    counters.clear()
    fast, record = _compile(m, SparsityPlan(layers={"0": _lp(CENTERS[center], SCALES[scale])}),
                            inductor=False)
    x = _input(lead, dtype, CENTERS[center], SCALES[scale])
    with torch.no_grad():
        got = fast(x)
        want = _reference(m[0], x, CENTERS[center], SCALES[scale])
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # eager: bit for bit
    assert got.dtype == dtype and not got.view(-1, N)[1:].isnan().any()
    (d,) = record[0]["decisions"]
    assert d["op"] == d["branch"] == "mask+linear"
    assert d["reason"] == (f"every call has >= {math.prod(lead)} rows (above the fused kernel's limit "
                           f"of {sparse_gemv.max_rows(N, K, dtype)}): mask left to Inductor to fuse "
                           "into x's producer")
    code = record[0]["stages"]["lower"]
    assert "fxsparse.threshold_linear" not in code and code.count("torch._C._nn.linear") == 1
    assert counters["fxsparse"]["lowered"] == 1 and counters["fxsparse"]["dense"] == 0


@pytest.mark.parametrize("lead", [(1,), (1, 1)])
def test_one_row_keeps_the_op(lead):
    """Decode (one row) is what the fused kernel is for: the op stays."""
    m = nn.Sequential(nn.Linear(K, N)).eval()
    fast, record = _compile(m, SparsityPlan(layers={"0": _lp(0.25)}), inductor=False)
    x = _input((3,), torch.float32, 0.25, None)[1].reshape(*lead, K)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), _reference(m[0], x, 0.25, None), rtol=0, atol=0)
    (d,) = record[0]["decisions"]
    assert (d["op"], d["branch"], d["reason"]) == ("fxsparse.threshold_linear", "threshold", "planned")
    assert "torch.ops.fxsparse.threshold_linear.default" in record[0]["stages"]["lower"]


def test_unknown_or_possibly_one_row_counts_keep_the_op():
    from torch._dynamo.decorators import mark_unbacked

    m = nn.Sequential(nn.Linear(K, N)).eval()
    plan = SparsityPlan(layers={"0": _lp()})
    # no traced shapes at all
    gm = lower_linears(match_linears(torch.fx.symbolic_trace(m)), plan)
    assert sum(n.target is single for n in gm.graph.nodes) == 1
    # an unbacked row count may be 0 or 1: decided per call
    fast, record = _compile(m, plan, inductor=False)
    x = torch.randn(5, K)
    mark_unbacked(x, 0)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), _reference(m[0], x, None, None), rtol=0, atol=0)
    assert [d["op"] for d in record[0]["decisions"]] == ["fxsparse.threshold_linear"]


def test_dynamic_sizes_start_at_two_and_one_row_recompiles_to_the_op():
    """Dynamo specialises sizes 0 and 1, so a dynamic graph never sees one row."""
    m = nn.Sequential(nn.Linear(K, N)).eval()
    record = []
    fast = torch.compile(m, backend="sparse_act", dynamic=True,
                         options={"plan": SparsityPlan(layers={"0": _lp(0.25)}), "record": record,
                                  "inductor": False})
    with torch.no_grad():
        for rows in (3, 7, 1):
            x = torch.randn(rows, K)
            torch.testing.assert_close(fast(x), _reference(m[0], x, 0.25, None), rtol=0, atol=0)
    assert [d["branch"] for g in record for d in g["decisions"]] == ["mask+linear", "threshold"]
    assert record[0]["decisions"][0]["reason"].startswith("every call has >= 2 rows")


def test_two_rows_of_16_bit_weights_keep_the_op_when_planned_sparse_enough():
    """Two bf16 rows are within the fused kernel's rows (``max_rows``) for a layer planned at
    ``TWO_ROW_MIN_SPARSITY`` or more (or of unknown sparsity): a static two-row graph keeps the
    op; a sparser-planned layer, three rows, or a dynamic count (2 rows up, mostly prefill)
    leave the mask to Inductor."""
    import dataclasses

    m = nn.Sequential(nn.Linear(K, N, dtype=torch.bfloat16)).eval()
    cut = sparse_gemv.TWO_ROW_MIN_SPARSITY
    assert sparse_gemv.max_rows(N, K, torch.bfloat16) == sparse_gemv.max_rows(N, K, torch.bfloat16, cut) == 2
    assert sparse_gemv.max_rows(N, K, torch.bfloat16, cut - 0.1) == 1
    cases = ((None, False, 2, "threshold"), (cut, False, 2, "threshold"),
             (cut - 0.1, False, 2, "mask+linear"), (None, False, 3, "mask+linear"),
             (None, True, 2, "mask+linear"))
    for target, dynamic, rows, branch in cases:
        plan = SparsityPlan(layers={"0": dataclasses.replace(_lp(0.25), target_sparsity=target)})
        torch.compiler.reset()
        record = []
        fast = torch.compile(m, backend="sparse_act", dynamic=dynamic,
                             options={"plan": plan, "record": record, "inductor": False})
        x = torch.randn(rows, K, dtype=torch.bfloat16)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), _reference(m[0], x, 0.25, None), rtol=0, atol=0)
        (d,) = record[0]["decisions"]
        assert d["branch"] == branch, (target, dynamic, rows)
        if dynamic:
            assert d["reason"].startswith("calls have 2 to ")
        elif branch == "mask+linear":
            assert d["reason"].startswith(f"every call has >= {rows} rows")


class Siblings(nn.Module):
    """q/k-like projections of one input, and a third layer on another input."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(K, N), nn.Linear(K, 4), nn.Linear(N, K)

    def forward(self, x):
        return self.o(self.q(x)) + self.k(x).sum(-1, keepdim=True)


def _siblings_plan(**o) -> SparsityPlan:
    mask = dict(center=CENTERS["vector"], scale=SCALES["vector"])
    return SparsityPlan(layers={"q": _lp(**mask), "k": _lp(n=4, **mask), **o})


@pytest.mark.parametrize("grouped", [True, False])
def test_siblings_share_one_mask_and_the_group_pass_leaves_them(grouped):
    torch.manual_seed(0)
    m = Siblings().eval()
    plan = _siblings_plan(o=_lp(threshold=0.3, k=N, n=K))
    fast, record = _compile(m, plan, inductor=False, group_siblings=grouped)
    x = torch.randn(2, 5, K)
    c, s = _tensors(CENTERS["vector"], SCALES["vector"])
    with torch.no_grad():
        got = fast(x)
        h = threshold_linear_reference(x, m.q.weight, m.q.bias, THRESHOLD, c, s)
        want = threshold_linear_reference(h, m.o.weight, m.o.bias, 0.3) + \
            threshold_linear_reference(x, m.k.weight, m.k.bias, THRESHOLD, c, s).sum(-1, keepdim=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [d["branch"] for d in record[0]["decisions"]] == ["mask+linear"] * 3
    code = record[0]["stages"]["group" if grouped else "lower"]
    assert code.count("torch.ops.aten.where") == 2  # q and k share one mask, o has its own
    assert "torch.ops.fxsparse" not in code


def test_lower_linears_on_a_graph_with_fake_values():
    """The pass on its own, on a graph whose nodes carry traced values (as Dynamo's do)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    torch.manual_seed(0)
    m = Siblings().eval()
    plan = _siblings_plan()
    gm = match_linears(torch.fx.symbolic_trace(m))
    x = torch.randn(3, K)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    gm = group_siblings(lower_linears(gm, plan), plan)
    ops = {d["name"]: (d["op"], d.get("branch")) for d in gm.meta["fxsparse_decisions"]}
    assert ops == {"q": ("mask+linear",) * 2, "k": ("mask+linear",) * 2, "o": ("linear", None)}
    c, s = _tensors(CENTERS["vector"], SCALES["vector"])
    with torch.no_grad():
        want = m.o(threshold_linear_reference(x, m.q.weight, m.q.bias, THRESHOLD, c, s)) + \
            threshold_linear_reference(x, m.k.weight, m.k.bias, THRESHOLD, c, s).sum(-1, keepdim=True)
    torch.testing.assert_close(gm(x), want, rtol=0, atol=0)


class NormLinear(nn.Module):
    """RMSNorm, then a planned linear: the mask should fuse into the norm's kernel."""

    def __init__(self, dtype):
        super().__init__()
        self.g = nn.Parameter(torch.rand(K, dtype=dtype) + 0.5)
        self.lin = nn.Linear(K, N, dtype=dtype)

    def norm(self, x):
        h = x.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.g.float()

    def forward(self, x):
        return self.lin(self.norm(x).to(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_fuses_the_mask_and_matches_the_reference(dtype):
    from torch._inductor import metrics

    torch.manual_seed(0)
    m = NormLinear(dtype).eval()
    center, scale = CENTERS["vector"], SCALES["vector"]
    plan = SparsityPlan(layers={"lin": _lp(center, scale)})
    x = torch.randn(2, 8, K, dtype=dtype)
    x[0, 0, 0] = math.nan
    kernels, outs = [], []
    for p in (plan, None):
        torch.compiler.reset()
        metrics.reset()
        fast, record = _compile(m, p) if p else (torch.compile(m, backend="inductor"), None)
        with torch.no_grad():
            outs.append(fast(x))
        kernels.append(metrics.generated_kernel_count)
        if p is not None:
            assert [d["branch"] for d in record[0]["decisions"]] == ["mask+linear"]
    assert kernels[0] == kernels[1]  # the mask costs no kernel of its own: fused into the norm's
    with torch.no_grad():
        h = m.norm(x)
        want = _reference(m.lin, h.to(dtype), center, scale)
    # Inductor may judge the unrounded float32 norm output (lower.py's docstring); this input has
    # no entry within bf16 rounding of the threshold, so both precisions agree on every entry
    ct, st = _tensors(center, scale)
    assert torch.equal(keep_mask_reference(h, THRESHOLD, ct, st),
                       keep_mask_reference(h.to(dtype), THRESHOLD, ct, st))
    assert not keep_mask_reference(h.to(dtype), THRESHOLD, ct, st).all()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0], want, equal_nan=True, **tol)
    assert outs[0][0, 0].isnan().all() and not outs[0][1].isnan().any()


def test_gradients_match_the_op():
    """Training through the decomposition gets the op's straight-through gradients."""
    c, s = _tensors(CENTERS["vector"], SCALES["vector"])
    grads = []
    for decomposed in (True, False):
        torch.manual_seed(0)
        lin = nn.Linear(K, N)
        x = torch.randn(4, K, generator=torch.Generator().manual_seed(3)).requires_grad_()
        if decomposed:
            fast, record = _compile(nn.Sequential(lin), SparsityPlan(layers={"0": _lp(
                CENTERS["vector"], SCALES["vector"])}), inductor=False)
            out = fast(x)
            assert record[0]["decisions"][0]["branch"] == "mask+linear"
        else:
            out = single(x, lin.weight, lin.bias, THRESHOLD, c, s, None)
        (out * torch.arange(N)).sum().backward()
        grads.append((x.grad, lin.weight.grad, lin.bias.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert (grads[0][0] == 0).any()  # dropped entries get no gradient


def test_inspection_describes_mask_plus_linear():
    d = {"name": "lin", "op": "mask+linear", "prefill": "threshold", "branch": "mask+linear"}
    for device, matmul in (("cpu", "matmul"), ("cuda", "cuBLAS")):
        text = _kernel_description(d, torch.device(device), _lp(), torch.bfloat16)
        assert text == f"aten mask (fused into x's producer by Inductor) + {matmul}, every call of this graph"


def test_threshold_is_compared_in_float32():
    """0.301 rounds to 0.30078125 in bf16: an x of 0.30078125 is below it in float32 (dropped) but
    not in bf16, so a score left in x's dtype would keep it."""
    m = nn.Sequential(nn.Linear(K, N, dtype=torch.bfloat16)).eval()
    fast, record = _compile(m, SparsityPlan(layers={"0": _lp(threshold=0.301)}), inductor=False)
    x = torch.full((3, K), 0.30078125, dtype=torch.bfloat16)
    x[1] = 2.0
    with torch.no_grad():
        got = fast(x)
        want = threshold_linear_reference(x, m[0].weight, m[0].bias, 0.301)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got[0], m[0].bias) and not torch.equal(got[1], m[0].bias)
    assert record[0]["decisions"][0]["branch"] == "mask+linear"


def test_fused_mask_judges_x_rounded_as_eager_does(monkeypatch):
    """bf16 entries that tie the threshold stay kept once Inductor fuses the mask into the norm
    (the backend turns on ``emulate_precision_casts``: unrounded, about half would drop)."""
    import torch._inductor.compile_fx as cfx

    seen, real = [], cfx.compile_fx

    def spy(*args, **kwargs):  # the backend's call passes its patches; Inductor's own do not
        if kwargs.get("config_patches") is not None:
            seen.append(kwargs["config_patches"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    torch.manual_seed(0)
    k = 64
    m = nn.Sequential(nn.RMSNorm(k, eps=1e-6), nn.Linear(k, k, bias=False)).to(torch.bfloat16).eval()
    with torch.no_grad():
        m[0].weight.uniform_(0.5, 1.5)
        m[1].weight.copy_(torch.eye(k))  # the output is the masked input itself
        x = torch.randn(64, k, dtype=torch.bfloat16)
        h = m[0](x)
        mags = h.float().abs().flatten()
        near = mags[(mags > 0.5) & (mags < 1.0)]
        values, counts = near.unique(return_counts=True)
        thr = float(values[counts.argmax()])  # the bf16 magnitude most entries tie
        assert counts.max() >= 4
        fast, record = _compile(m, SparsityPlan(layers={"1": LayerPlan(thr, k, k)}))
        out = fast(x)
    assert record[0]["decisions"][0]["branch"] == "mask+linear"
    want = threshold_linear_reference(h, m[1].weight, None, thr)
    assert torch.equal(out != 0, want != 0)
    assert seen[-1]["emulate_precision_casts"] is True
    torch.compiler.reset()  # the option off: Inductor's default precision (no patch)
    with torch.no_grad():
        _compile(m, SparsityPlan(layers={"1": LayerPlan(thr, k, k)}), emulate_precision_casts=False)[0](x)
    assert "emulate_precision_casts" not in seen[-1]


class _Two(nn.Module):
    def __init__(self, inner_autocast: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)
        self.inner = inner_autocast

    def forward(self, x):
        if self.inner:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.b(self.a(x))
        return self.b(self.a(x))


@pytest.mark.parametrize("method", ["threshold", "topk"])
@pytest.mark.parametrize("where", ["outside", "inside"])  # autocast around the call / in forward
@pytest.mark.parametrize("inductor", [False, True])
def test_autocast_keeps_eager_dtypes_and_values(method, where, inductor):
    """Under ``torch.autocast`` a planned linear returns the autocast dtype with eager's mask
    (fxsparse's ops compute in their inputs' dtypes and have no autocast rule of their own)."""
    from fxsparse.reference import plan_hooks

    torch.manual_seed(0)
    m = _Two(inner_autocast=where == "inside").eval()
    lp = LayerPlan(threshold=0.3, in_features=16, out_features=16, target_sparsity=0.5,
                   method="topk" if method == "topk" else "quantile")
    plan = SparsityPlan(layers={"a": lp}, model=SparsityPlan.fingerprint(m))
    x = torch.randn(1, 16)
    outer = torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "outside")
    with torch.no_grad(), outer:
        with plan_hooks(m, plan):
            want = m(x)
        torch._dynamo.reset()
        record = []
        got = torch.compile(m, backend="sparse_act",
                            options={"plan": plan, "inductor": inductor, "record": record})(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    (d,) = [d for d in record[-1]["decisions"] if d["name"] == "a"]
    assert "autocast" in d["reason"]
    assert d["op"] == ("fxsparse.topk_linear" if method == "topk" else "mask+linear")


def test_ops_ignore_autocast():
    """The ops compute in their inputs' dtypes under autocast, as their fake impls say."""
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert single(x, w, None, 0.3).dtype == torch.float32
        assert torch.compile(lambda x: single(x, w, None, 0.3), backend="aot_eager")(x).dtype == torch.float32
