"""fxsparse::topk_linear: semantics against a numpy oracle, ties, opcheck, autograd, lowering."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxsparse  # noqa: F401  (registers the ops and the backend)
from fxsparse import LayerPlan, SparsityPlan
from fxsparse.kernels import topk_keep_count, topk_keep_mask_reference, topk_linear_reference
from fxsparse.plan import linear_layers
from fxsparse.reference import plan_hooks

from conftest import tiny_llama, token_batches

op = torch.ops.fxsparse.topk_linear.default


def oracle_mask(x: np.ndarray, k: int, center, scale) -> np.ndarray:
    """Row by row: keep entries whose score is not below the k-th largest score (NaN largest)."""
    d = np.abs(x.astype(np.float32) - (0.0 if center is None else center)).astype(np.float32)
    if scale is not None:
        d = (d * scale).astype(np.float32)
    rows = d.reshape(-1, d.shape[-1])
    keep = np.ones_like(rows, dtype=bool)
    for r, row in enumerate(rows):
        if k >= row.size:
            continue
        if k <= 0:
            tau = np.inf
        else:
            order = sorted(row.tolist(), key=lambda v: (not np.isnan(v), v), reverse=False)
            nan_first = [v for v in order if np.isnan(v)] + sorted(
                [v for v in order if not np.isnan(v)], reverse=True)
            tau = nan_first[k - 1]
        keep[r] = ~(row < tau)
    return keep.reshape(d.shape)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), n=st.integers(1, 24), data=st.data())
def test_mask_matches_oracle_including_ties(rows, n, data):
    k = data.draw(st.integers(0, n + 1))
    # few distinct integer values force ties at the k-th score
    vals = data.draw(st.lists(st.integers(-3, 3), min_size=rows * n, max_size=rows * n))
    x = torch.tensor(vals, dtype=torch.float32).reshape(rows, n) * 0.5
    use_c = data.draw(st.booleans())
    use_s = data.draw(st.booleans())
    center = torch.tensor(0.5) if use_c else None
    scale = torch.arange(1, n + 1, dtype=torch.float32) % 3 if use_s else None
    got = topk_keep_mask_reference(x, k, center, scale).numpy()
    want = oracle_mask(x.numpy(), k, None if center is None else 0.5,
                       None if scale is None else scale.numpy())
    np.testing.assert_array_equal(got, want)
    kept = got.sum(-1)
    assert (kept >= min(k, n)).all()  # ties only ever add entries


def test_nan_is_kept_and_edges():
    x = torch.tensor([[float("nan"), 0.1, -3.0, 0.2]])
    # NaN ranks above every number: with k <= #NaN the k-th score is NaN and nothing is below it
    assert topk_keep_mask_reference(x, 1, None, None).all()
    assert topk_keep_mask_reference(x, 2, None, None).tolist() == [[True, False, True, False]]
    assert topk_keep_mask_reference(x, 0, None, None).tolist() == [[True, False, False, False]]
    assert topk_keep_mask_reference(x, 9, None, None).all()
    assert topk_keep_count(576, 0.4) == 346 and topk_keep_count(10, 0.0) == 10


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("center", [None, "scalar", "vector"])
def test_opcheck_and_reference(bias, center):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    w = torch.randn(8, 16)
    b = torch.randn(8) if bias else None
    c = {None: None, "scalar": torch.tensor(0.1), "vector": torch.randn(16) * 0.1}[center]
    s = torch.rand(16) + 0.5
    torch.library.opcheck(op, (x, w, b, 5, c, s))
    out = op(x, w, b, 5, c, s)
    keep = topk_keep_mask_reference(x, 5, c, s)
    fill = torch.zeros(()) if c is None else c
    ref = torch.nn.functional.linear(torch.where(keep, x, fill), w, b)
    torch.testing.assert_close(out, ref)
    assert (keep.sum(-1) == 5).all()  # continuous data: no ties


def test_autograd_straight_through():
    torch.manual_seed(1)
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w, b: op(x, w, b, 4, None, None), (x, w, b))
    out = op(x, w, b, 4, None, None).sum()
    out.backward()
    keep = topk_keep_mask_reference(x.detach(), 4, None, None)
    assert (x.grad[~keep] == 0).all()
    ref = topk_linear_reference(x.detach(), w.detach(), b.detach(), 4)
    torch.testing.assert_close(op(x, w, b, 4, None, None), ref)


def test_lower_pass_emits_topk_for_topk_plans():
    model = tiny_llama()
    linears = linear_layers(model)
    layers = {}
    for name, (out_f, in_f) in linears.items():
        if name.endswith("mlp.up_proj") or name.endswith("mlp.down_proj"):
            layers[name] = LayerPlan(threshold=0.0, in_features=in_f, out_features=out_f,
                                     target_sparsity=0.5, method="topk")
        elif name.endswith("mlp.gate_proj"):
            layers[name] = LayerPlan(threshold=0.05, in_features=in_f, out_features=out_f,
                                     target_sparsity=0.3, method="quantile")
    plan = SparsityPlan(layers=layers, model=SparsityPlan.fingerprint(model))
    record = []
    compiled = torch.compile(model, backend="sparse_act",
                             options={"plan": plan, "inductor": False, "record": record})
    ids = token_batches(1, batch=2, seq=12)[0]
    with torch.no_grad():
        got = compiled(ids, use_cache=False).logits
        with plan_hooks(model, plan):
            want = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ops = [d["op"] for r in record for d in r["decisions"]]
    assert ops.count("fxsparse.topk_linear") == 4  # 2 blocks x (up, down)
    assert ops.count("mask+linear") == 2  # threshold layers, 24 rows: the mask as aten ops
    code = "".join(r["stages"]["lower"] for r in record)
    assert code.count("fxsparse.topk_linear") == 4
