"""``dispatch.decide``: a site's facts -> branch and reason, the one rule lower, prepare and explain share."""

import math

import pytest
import torch

from fxsparse import LayerPlan, SparsityPlan, prepare_weights
from fxsparse.dispatch import BRANCHES, SiteFacts, decide, group_width, kernel_rows, sibling_sets
from fxsparse.kernels.crossover import NEVER

CPU = torch.device("cpu")


def entry(**kw) -> LayerPlan:
    kw = {"threshold": 0.5, "in_features": 64, "out_features": 32, "target_sparsity": 0.5, **kw}
    return LayerPlan(**kw)


def facts(lp: LayerPlan, **kw) -> SiteFacts:
    kw.setdefault("device", CPU)
    kw.setdefault("weight_dtype", torch.bfloat16)
    return SiteFacts(plan=lp, **kw)


@pytest.mark.parametrize(("lp", "rows", "branch", "why"), [
    (entry(), (1, 1), "threshold", "planned"),
    (entry(), None, "threshold", "planned"),  # no row counts (prepare_weights): the kernel's layout
    (entry(threshold=0.0), (1, 1), "dense", "drops nothing"),
    (entry(), (8, 8), "mask+linear", "every call has >= 8 rows"),
    (entry(), (2, math.inf), "mask+linear", "calls have 2 to inf rows"),
    (entry(target_sparsity=0.5), (2, 2), "threshold", "planned"),  # 50%: two rows take the stream
    (entry(target_sparsity=0.3), (2, 2), "mask+linear", "limit of 1"),  # below 50%: one row only
    (entry(prefill="dense"), (1, 1), "threshold", "planned"),
    (entry(prefill="dense"), (64, 64), "dense", "planned"),
    (entry(prefill="dense"), None, "per-call", "planned"),
    (entry(prefill="dense", decode_rows=4), (1, 8), "per-call", "planned"),
])
def test_branch_and_reason(lp, rows, branch, why):
    d = decide(facts(lp, rows=rows))
    assert d.branch in BRANCHES
    assert (d.branch, why in d.reason) == (branch, True), d
    assert d.plain == (branch in ("dense", "mask+linear"))
    if lp.prefill == "dense":
        assert d.min_rows_24 == NEVER


def test_prefill_24_takes_the_crossover_option():
    lp = entry(prefill="2:4")
    assert decide(facts(lp, rows=(64, 64)), crossover_rows=32).branch == "2:4"
    assert decide(facts(lp, rows=(20, 20)), crossover_rows=32).branch == "dense"
    assert decide(facts(lp, rows=(16, 16)), crossover_rows=32).branch == "mask+linear"  # decode rows
    assert decide(facts(lp, rows=(1, 1)), crossover_rows=32).branch == "threshold"
    d = decide(facts(lp, rows=None), crossover_rows=32)
    assert (d.branch, d.min_rows_24) == ("per-call", 32)
    assert decide(facts(lp, rows=(64, 64))).min_rows_24 == NEVER  # CPU: never measured, never 2:4


def test_topk_keeps_its_op_and_casts_under_autocast():
    lp = entry(method="topk", target_sparsity=0.25)
    d = decide(facts(lp, rows=(8, 8)))  # top-k has no row limit
    assert (d.branch, d.topk_k, d.cast_out) == ("threshold", 48, None)
    d = decide(facts(lp, rows=(1, 1), autocast=torch.bfloat16))
    assert (d.branch, d.cast_out) == ("threshold", torch.bfloat16)
    assert "output cast" in d.reason


def test_autocast_lowers_to_mask_and_the_autocast_linear():
    d = decide(facts(entry(), rows=(1, 1), autocast=torch.bfloat16))
    assert d.branch == "mask+linear" and "torch.autocast" in d.reason
    d = decide(facts(entry(threshold=0.0), rows=(1, 1), autocast=torch.bfloat16))
    assert d.branch == "dense"  # dense stays dense: the linear runs under autocast as in eager


def test_kernel_rows_follows_dtype_and_sparsity():
    assert kernel_rows(facts(entry(target_sparsity=0.5))) == 2
    assert kernel_rows(facts(entry(target_sparsity=0.3))) == 1
    assert kernel_rows(facts(entry(), weight_dtype=torch.float32)) == 1
    assert kernel_rows(SiteFacts(plan=entry(), device=CPU, input_dtype=torch.float16)) == 2


def test_sibling_sets_and_widths():
    plan = SparsityPlan(layers={
        "m.q": entry(out_features=32), "m.k": entry(out_features=8), "m.v": entry(out_features=8),
        "m.o": entry(threshold=0.7), "n.q": entry(out_features=32),
    })
    sets = sibling_sets(plan)
    assert sets["m.k"] == ("m.q", "m.k", "m.v") and sets["m.o"] == ("m.o",) and sets["n.q"] == ("n.q",)
    assert group_width(plan, sets["m.k"]) == 48 and group_width(plan, ("m.k",)) == 8


def test_prepare_weights_converts_only_what_is_not_dense(monkeypatch):
    """prepare_weights asks the same function: a dense decision keeps the row-major weight."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(64, 32))
    plan = SparsityPlan(layers={"0": entry(), "1": entry(threshold=0.0)})
    done = prepare_weights(model, plan, device_types=("cpu",))
    assert done == ["0"]
    assert model[0].weight.stride() == (1, 32) and model[1].weight.stride() == (64, 1)
