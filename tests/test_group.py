"""Sibling projections on one input: the group op and the pass that forms it."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxsparse
from fxsparse import SparsityPlan
from fxsparse.dispatch import sibling_sets
from fxsparse.passes import group_siblings, lower_linears, match_linears
from fxsparse.reference import plan_hooks

from conftest import calibrated_tiny_llama, token_batches

group = torch.ops.fxsparse.threshold_linear_group.default
single = torch.ops.fxsparse.threshold_linear.default


@st.composite
def group_cases(draw):
    k = draw(st.integers(1, 40))
    ns = draw(st.lists(st.integers(1, 20), min_size=1, max_size=3))
    lead = draw(st.sampled_from([(1,), (3,), (2, 5)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(*lead, k, generator=g).to(dtype)
    if draw(st.booleans()):  # non-contiguous input
        x = torch.randn(*lead, 2 * k, generator=g).to(dtype)[..., ::2]
    if draw(st.booleans()):
        x.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf]))
    ws = [torch.randn(n, k, generator=g).to(dtype) for n in ns]
    bs = [torch.randn(n, generator=g).to(dtype) for n in ns] if draw(st.booleans()) else []
    thr = draw(st.sampled_from([0.0, 0.3, 1.0, math.inf]))
    center = draw(st.sampled_from([None, "scalar", "vector"]))
    center = None if center is None else (torch.tensor(0.2) if center == "scalar"
                                          else torch.randn(k, generator=g) * 0.1)
    scale = torch.rand(k, generator=g) + 0.5 if draw(st.booleans()) else None
    cbs = [] if center is None or draw(st.booleans()) else \
        [torch.nn.functional.linear(center.to(dtype).float().expand(k), w.float()) for w in ws]
    return x, ws, bs, thr, center, scale, cbs


@settings(max_examples=60, deadline=None)
@given(group_cases())
def test_group_is_each_member_alone(case):
    x, ws, bs, thr, center, scale, cbs = case
    outs = group(x, ws, bs, thr, center, scale, cbs)
    assert len(outs) == len(ws)
    for i, (out, w) in enumerate(zip(outs, ws, strict=True)):
        want = single(x, w, bs[i] if bs else None, thr, center, scale, cbs[i] if cbs else None)
        assert out.shape == want.shape and out.dtype == want.dtype
        torch.testing.assert_close(out, want, equal_nan=True)


def test_group_errors_name_the_argument():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="no weights"):
        group(x, [], [], 0.1, None, None, [])
    with pytest.raises(RuntimeError, match="biases must be empty or one per weight"):
        group(x, [w, w], [torch.zeros(3)], 0.1, None, None, [])
    with pytest.raises(RuntimeError, match="x has 4 input features"):
        group(x, [w, torch.randn(3, 5)], [], 0.1, None, None, [])


@pytest.mark.parametrize("with_center", [False, True])
def test_group_opcheck(with_center):
    x = torch.randn(3, 8, requires_grad=True)
    ws = [torch.randn(5, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)]
    bs = [torch.randn(5, requires_grad=True), torch.randn(2, requires_grad=True)]
    c = torch.tensor(0.1) if with_center else None
    cbs = [torch.nn.functional.linear(torch.full((8,), 0.1), w.detach()) for w in ws] if with_center else []
    torch.library.opcheck(group, (x, ws, bs, 0.5, c, torch.rand(8) + 0.5, cbs))
    torch.library.opcheck(group, (x.detach()[None], [w.detach() for w in ws], [], 0.0, None, None, []))


def test_group_gradient_is_the_members_sum():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    sum(o.square().sum() for o in group(x, ws, [], 0.7, None, None, [])).backward()
    x2 = x.detach().clone().requires_grad_()
    ws2 = [w.detach().clone().requires_grad_() for w in ws]
    sum(single(x2, w, None, 0.7, None, None, None).square().sum() for w in ws2).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for a, b in zip(ws, ws2, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    # an output that does not reach the loss contributes nothing (autograd hands it zeros)
    x.grad = None
    for w in ws:
        w.grad = None
    group(x, ws, [], 0.7, None, None, [])[1].sum().backward()
    assert not ws[0].grad.any() and not ws[2].grad.any() and ws[1].grad.any()
    keep = ~(x.detach().abs() < 0.7)
    torch.testing.assert_close(x.grad, torch.where(keep, ws[1].detach().sum(0).expand_as(x), 0.0))


# -- the pass -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_plan():
    return calibrated_tiny_llama(4)


def test_calibration_gives_siblings_one_mask(model_and_plan):
    """q/k/v (and gate/up) observe the same tensor, so they get the same threshold."""
    _, plan = model_and_plan
    sets = sibling_sets(plan)
    for b in range(2):
        p = f"model.layers.{b}."
        assert sets[p + "self_attn.q_proj"] == tuple(p + f"self_attn.{n}_proj" for n in "qkv")
        assert sets[p + "mlp.gate_proj"] == (p + "mlp.gate_proj", p + "mlp.up_proj")
        assert sets[p + "self_attn.o_proj"] == (p + "self_attn.o_proj",)
        assert sets[p + "mlp.down_proj"] == (p + "mlp.down_proj",)


def _compiled_matches_eager(model, plan, seed: int, fullgraph: bool = False, **options) -> list[dict]:
    """Compile with ``plan``, run one token (one row: more would be mask + linear), check the
    logits against the eager hook reference; the backend's record."""
    record = []
    fast = torch.compile(model, backend="sparse_act", fullgraph=fullgraph,
                         options={"plan": plan, "record": record, **options})
    x = token_batches(1, batch=1, seq=1, seed=seed)[0]
    with torch.no_grad():
        got = fast(x, use_cache=False).logits
        with plan_hooks(model, plan):
            want = model(x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return record


@pytest.mark.parametrize("grouped", [True, False])
def test_backend_groups_siblings_and_matches_eager(model_and_plan, grouped):
    model, plan = model_and_plan
    record = _compiled_matches_eager(model, plan, 5, fullgraph=True, group_siblings=grouped)
    decisions = {d["name"]: d for g in record for d in g["decisions"]}
    stages = record[0]["stages"]
    if not grouped:
        assert "group" not in stages
        assert all(d["op"] in ("fxsparse.threshold_linear", "fxsparse.threshold_linear_act", "linear")
                   for d in decisions.values())
        return
    code = stages["group"]
    assert code.count("torch.ops.fxsparse.threshold_linear_group.default") == 4  # qkv, gate/up x 2
    assert code.count("torch.ops.fxsparse.threshold_linear.default") == 4  # o, down x 2
    d = decisions["model.layers.1.self_attn.k_proj"]
    assert d["op"] == "fxsparse.threshold_linear_group"
    assert d["group"] == [f"model.layers.1.self_attn.{n}_proj" for n in "qkv"]
    # down_proj reads silu(gate) * up, which the activation pass then folds into it
    assert decisions["model.layers.0.mlp.down_proj"]["op"] == "fxsparse.threshold_linear_act"


def test_different_masks_are_not_grouped(model_and_plan):
    model, plan = model_and_plan
    data = plan.to_dict()
    data["layers"]["model.layers.0.self_attn.k_proj"]["threshold"] *= 1.5
    data["layers"]["model.layers.0.mlp.up_proj"]["center"] = 0.01
    changed = SparsityPlan.from_dict(data)
    record = _compiled_matches_eager(model, changed, 3)
    groups = {tuple(d["group"]) for g in record for d in g["decisions"] if "group" in d}
    assert groups == {("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"),
                      ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                       "model.layers.1.self_attn.v_proj"),
                      ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")}


@pytest.mark.parametrize("prefill", ["dense", "2:4"])
def test_decode_graphs_of_prefill_plans_group_siblings(model_and_plan, prefill):
    """A dense- or 2:4-prefill plan still runs q/k/v and gate/up as one launch per set in decode."""
    model, plan = model_and_plan
    changed = SparsityPlan.from_dict(plan.to_dict()).set_prefill(prefill)
    record = _compiled_matches_eager(model, changed, 3)
    decisions = {d["name"]: d for g in record for d in g["decisions"]}
    assert decisions["model.layers.0.mlp.up_proj"]["op"] == "fxsparse.threshold_linear_group"
    assert decisions["model.layers.1.self_attn.v_proj"]["group"] == [
        f"model.layers.1.self_attn.{n}_proj" for n in "qkv"]


class Siblings(nn.Module):
    """Three projections of one input, as q/k/v: a wide one and two narrow ones."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 16, bias=False), nn.Linear(8, 4, bias=False), \
            nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.q(x).sum(-1) + self.k(x).sum(-1) * self.v(x).sum(-1)


def test_dense_when_faster_judges_the_set_width(monkeypatch):
    """Narrow members lose alone (faked: CPU) but ride along with the wide one in one launch."""
    from fxsparse import dispatch

    asked = []

    def fake_pays(n, k, dtype, device, sparsity):
        asked.append(n)
        return (n >= 16, (5.0, 4.0 if n >= 16 else 8.0))

    monkeypatch.setattr(dispatch, "gemv_pays", fake_pays)
    torch.manual_seed(0)
    m = Siblings().eval()
    plan = SparsityPlan(layers={name: fxsparse.LayerPlan(threshold=0.3, in_features=8, out_features=n,
                                                         target_sparsity=0.5)
                                for name, n in [("q", 16), ("k", 4), ("v", 4)]})
    gm = group_siblings(lower_linears(match_linears(torch.fx.symbolic_trace(m)), plan), plan)
    assert asked == [24, 24, 24]
    assert [d["op"] for d in gm.meta["fxsparse_decisions"]] == ["fxsparse.threshold_linear_group"] * 3
    x = torch.randn(3, 8)
    with torch.no_grad(), plan_hooks(m, plan):
        want = m(x)
    torch.testing.assert_close(gm(x), want)
    assert fxsparse.prepare_weights(m, plan, device_types=("cpu",)) == ["q", "k", "v"]

    # judged alone, the narrow ones run dense and keep their row-major weight
    asked.clear()
    m = Siblings().eval()
    gm = lower_linears(match_linears(torch.fx.symbolic_trace(m)), plan, grouped=False)
    ops = [d["op"] for d in gm.meta["fxsparse_decisions"]]
    assert ops == ["fxsparse.threshold_linear", "linear", "linear"]
    assert fxsparse.prepare_weights(m, plan, device_types=("cpu",), group_siblings=False) == ["q"]


class _MutatingAttn(nn.Module):
    """q_proj and k_proj read the same x node, with an in-place write to x between them."""

    def __init__(self, k: int = 16, n: int = 8) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(k, n), nn.Linear(k, n)

    def forward(self, x):
        x = x * 1.0
        q = self.q_proj(x)
        x.mul_(3.0)  # Dynamo keeps this in the graph: k_proj must see the new values
        return q, self.k_proj(x)


@pytest.mark.parametrize("rows", [1, 4])  # one launch for both (1 row), one shared mask (4 rows)
def test_in_place_write_between_siblings_is_respected(rows):
    from fxsparse import LayerPlan

    torch.manual_seed(0)
    m = _MutatingAttn().eval()
    lp = lambda: LayerPlan(threshold=0.5, in_features=16, out_features=8, target_sparsity=0.5)  # noqa: E731
    plan = SparsityPlan(layers={"q_proj": lp(), "k_proj": lp()}, model=SparsityPlan.fingerprint(m))
    x = torch.randn(rows, 16)
    with torch.no_grad():
        with plan_hooks(m, plan):
            want = m(x.clone())
        torch._dynamo.reset()
        got = torch.compile(m, backend="sparse_act", options={"plan": plan, "inductor": False})(x.clone())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
