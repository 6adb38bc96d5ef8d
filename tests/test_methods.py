"""Calibration methods: one pass serves every method and target; each method's defining property."""

import math

import numpy as np
import pytest
import torch

import fxsparse
from fxsparse import IgnoredScope, SparsityPlan, TargetScope
from fxsparse.attribution import METRICS, attribution_scores
from fxsparse.evaluation import evaluate
from fxsparse.methods import (
    allocate_sparsity,
    collect_method_statistics,
    column_norms,
    nncf_ema,
    plan_from_observers,
    plan_perplexity,
)
from fxsparse.plan import linear_layers, size_weighted_mean
from fxsparse.reference import plan_hooks

from conftest import tiny_llama, token_batches

CALIB = token_batches(6, batch=2, seq=32, seed=1)
FRESH = token_batches(6, batch=2, seq=32, seed=2)


@pytest.fixture(scope="module")
def setup():
    torch.compiler.reset()
    model = tiny_llama()
    names = [n for n in linear_layers(model) if n.endswith("_proj")]
    stats = collect_method_statistics(model, CALIB, names,
                                      methods=("quantile", "norm", "pplp", "attribution"),
                                      metrics=METRICS, attribution_options={"n_steps": 2},
                                      progress=False)
    return model, names, stats


def measured(model, plan, batches):
    probes = {n: fxsparse.evaluation.make_probe(n, lp) for n, lp in plan.layers.items()}
    with torch.no_grad(), plan_hooks(model, plan, probes):
        for b in batches:
            model(b, use_cache=False)
    return {n: p.probe_stats()["sparsity"] for n, p in probes.items()}


@pytest.mark.parametrize("method,opts", [("quantile", {}), ("mode", {"center": "median"}),
                                         ("mode", {"center": "kde"}), ("norm", {}),
                                         ("attribution", {"metric": "cor_gxo"})])
def test_one_pass_serves_every_target_on_fresh_data(setup, method, opts):
    model, names, stats = setup
    for s in (0.3, 0.5):
        plan = plan_from_observers(stats, dict.fromkeys(names, s), method, **opts)
        on_fresh = measured(model, plan, FRESH)
        worst = max(abs(on_fresh[n] - s) for n in names)
        assert worst <= 0.03, (method, s, worst)
        for lp in plan.layers.values():
            assert abs(lp.calibrated_sparsity - s) < 0.01


def test_calibrate_equals_plan_from_observers(setup):
    model, names, stats = setup
    targets = {TargetScope(patterns=[r".*mlp\..*_proj"]): 0.4}
    torch.compiler.reset()
    plan = fxsparse.calibrate(model, CALIB, targets, IgnoredScope(names=["lm_head"]),
                              method="mode", center="median", progress=False)
    again = plan_from_observers(stats, {n: 0.4 for n in plan.layers}, "mode", center="median")
    for n, lp in plan.layers.items():
        assert lp.threshold == pytest.approx(again.layers[n].threshold, rel=1e-9)
        assert lp.center == pytest.approx(again.layers[n].center) and lp.center != 0.0
    assert plan.meta["center"] == "median" and plan.skipped["lm_head"] == "ignored_scope"
    SparsityPlan.from_dict(plan.to_dict()).check_model(model)  # a valid plan


def test_quantile_ema_follows_nncf_rule(setup):
    model, names, stats = setup
    obs = stats.groups[names[0]]["plain"]
    assert len(obs.batch_quantiles) == len(CALIB)
    # exact per-batch quantiles, as torch.quantile computes them
    x = []
    h = dict(model.named_modules())[names[0]].register_forward_pre_hook(
        lambda m, a: x.append(a[0].detach()))
    with torch.no_grad():
        for b in CALIB:
            model(b, use_cache=False)
    h.remove()
    want = [torch.quantile(t.abs().flatten().double(), 0.4).item() for t in x]
    np.testing.assert_allclose(obs.batch_thresholds(0.4), want, rtol=1e-6)
    plan = plan_from_observers(stats, {names[0]: 0.4}, "quantile", quantile_ema=True)
    assert plan.layers[names[0]].threshold == pytest.approx(nncf_ema(want, 0.2))
    # NNCF 3.4's update (a bias-free weighted mean), and the earlier one that underweights
    assert nncf_ema([1.0, 2.0], 0.5) == pytest.approx((0.5 * 2 + 0.5 * 1 * 0.5) / 0.75)
    assert nncf_ema([1.0, 1.0, 1.0], 0.2) == nncf_ema([1.0, 1.0, 1.0], 0.2, "pandas") == pytest.approx(1.0)
    assert nncf_ema([1.0, 2.0], 0.5, "nncf_legacy") == pytest.approx(0.5 * 2 + 0.5 * 1 * 0.5 / 0.75)


def test_quantile_ema_with_refine_reproduces_nncf():
    """NNCF 3.4's thresholds on this tiny Llama and data, recorded by
    bench/probe/nncf_thresholds.py: NNCF calibrates with its sparsifiers on (each layer sees
    inputs sparsified upstream) and averages batch quantiles with its EMA rule;
    ``quantile_ema=True, refine=1`` is fxsparse's way to the same plan."""
    import json
    from pathlib import Path

    from fxsparse import TargetScope, calibrate

    from conftest import tiny_llama, token_batches

    rec = json.loads((Path(__file__).parent / "data" / "nncf_thresholds_tiny_llama.json").read_text())
    targets = {TargetScope(patterns=[r".*mlp\.(up|gate)_proj"]): 0.3,
               TargetScope(patterns=[r".*mlp\.down_proj"]): 0.5}
    model, data = tiny_llama(), token_batches(6)
    got = {n: lp.threshold for n, lp in calibrate(model, data, targets, quantile_ema=True, refine=1,
                                                  progress=False).layers.items()}
    dense = {n: lp.threshold for n, lp in calibrate(model, data, targets, quantile_ema=True,
                                                    progress=False).layers.items()}
    assert set(got) == set(rec["thresholds"])
    for n, want in rec["thresholds"].items():
        assert got[n] == pytest.approx(want, rel=2e-3), n
    # without the upstream-sparsified pass the down projections' thresholds are off
    assert any(abs(dense[n] / w - 1) > 1e-2 for n, w in rec["thresholds"].items())


def test_norm_and_pplp_use_column_norms(setup):
    model, names, stats = setup
    mods = dict(model.named_modules())
    plan = plan_from_observers(stats, dict.fromkeys(names, 0.4), "norm")
    for n in names:
        np.testing.assert_allclose(plan.layers[n].channel_scale,
                                   column_norms(mods[n].weight).numpy(), rtol=1e-6)
    lo = plan_from_observers(stats, dict.fromkeys(names, 0.0), "pplp", cett=0.05)
    hi = plan_from_observers(stats, dict.fromkeys(names, 0.0), "pplp", cett=0.3)
    for n in names:
        assert lo.layers[n].calibrated_sparsity <= hi.layers[n].calibrated_sparsity
        assert lo.layers[n].channel_scale == plan.layers[n].channel_scale
    matched = plan_from_observers(stats, dict.fromkeys(names, 0.4), "pplp")
    achieved = {n: matched.layers[n].calibrated_sparsity for n in names}
    assert size_weighted_mean(achieved, linear_layers(model)) == pytest.approx(0.4, abs=0.005)


def test_pplp_search_meets_perplexity_budget(setup):
    model, names, stats = setup
    plan = plan_from_observers(stats, dict.fromkeys(names, 0.0), "pplp", p=1.0, model=model,
                               data=CALIB[:2])
    dense = plan.meta["dense_ppl_calibration"]
    assert plan_perplexity(model, CALIB[:2], plan) <= dense * 1.01 + 1e-9
    assert plan.meta["p"] == 1.0 and len(plan.meta["search"]) == 10


def test_fat_uses_one_epsilon(setup):
    model, names, stats = setup
    plan = plan_from_observers(stats, dict.fromkeys(names, 0.4), "fat", epsilon=0.02)
    assert {lp.threshold for lp in plan.layers.values()} == {0.02}
    assert all(lp.target_sparsity is None for lp in plan.layers.values())
    matched = plan_from_observers(stats, dict.fromkeys(names, 0.4), "fat")
    assert len({lp.threshold for lp in matched.layers.values()}) == 1
    achieved = {n: matched.layers[n].calibrated_sparsity for n in names}
    assert size_weighted_mean(achieved, linear_layers(model)) == pytest.approx(0.4, abs=0.005)


def test_topk_plan_drops_exact_share_per_token(setup):
    model, names, stats = setup
    plan = plan_from_observers(stats, dict.fromkeys(names, 0.5), "topk")
    probes = {n: fxsparse.evaluation.make_probe(n, lp) for n, lp in plan.layers.items()}
    with torch.no_grad(), plan_hooks(model, plan, probes):
        model(FRESH[0], use_cache=False)
    for p in probes.values():
        st = p.probe_stats()
        assert st["sparsity"] == pytest.approx(0.5, abs=1e-6) and st["token_std"] < 1e-6


def test_attribution_scores_properties(setup):
    model, names, stats = setup
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for metric in METRICS:
        for n in names:
            a = stats.scores[metric][n]
            assert a.shape == (dict(model.named_modules())[n].in_features,)
            assert torch.isfinite(a).all() and (a >= 0).all() and a.sum() > 0, (metric, n)
            if n.endswith("o_proj"):  # heads are scored as units
                per_head = a.reshape(-1, hd)
                assert torch.allclose(per_head, per_head[:, :1].expand_as(per_head))
    for n in names:  # |sum x g| <= sum |x g|
        assert (stats.scores["snip"][n] <= stats.scores["gxo"][n] * (1 + 1e-5) + 1e-12).all()
    with pytest.raises(ValueError, match="unknown attribution metric"):
        attribution_scores(model, CALIB[:1], names[:1], metrics=("magic",))


def test_allocation_meets_budget_and_spares_sensitive_layers(setup):
    model, names, stats = setup
    targets = allocate_sparsity(model, CALIB, names, 0.4, max_tokens=64)
    assert 0.4 <= size_weighted_mean(targets, linear_layers(model)) <= 0.45
    assert len(set(targets.values())) > 1  # not uniform
    plan = plan_from_observers(stats, targets, "quantile")
    assert {n: lp.target_sparsity for n, lp in plan.layers.items()} == targets


def test_evaluate_hooks_match_compiled_probes(setup):
    model, names, stats = setup
    ids = torch.cat([b.reshape(-1) for b in FRESH[:2]])
    for method, opts in (("topk", {}), ("mode", {"center": "median"})):
        plan = plan_from_observers(stats, dict.fromkeys(names, 0.4), method, **opts)
        torch.compiler.reset()
        a = evaluate(model, ids, plan, window=32, progress=False)
        cache = {}
        b = evaluate(model, ids, plan, window=32, progress=False, engine="hooks", dense_cache=cache)
        c = evaluate(model, ids, plan, window=32, progress=False, engine="hooks", dense_cache=cache)
        assert len(cache) == 4 and b.dense_ppl == c.dense_ppl
        assert a.sparse_ppl == pytest.approx(b.sparse_ppl, rel=1e-4)
        for n in names:
            assert a.layers[n]["sparsity"] == pytest.approx(b.layers[n]["sparsity"], abs=1e-3)


def test_option_errors(setup):
    model, names, stats = setup
    with pytest.raises(TypeError, match="unknown option"):
        plan_from_observers(stats, {names[0]: 0.3}, "quantile", center="kde")
    with pytest.raises(ValueError, match="center must be"):
        plan_from_observers(stats, {names[0]: 0.3}, "mode", center="mean")
    with pytest.raises(TypeError, match="only apply to method 'attribution'"):
        fxsparse.calibrate(model, CALIB[:1], {TargetScope(names=[names[0]]): 0.3}, n_steps=3,
                           progress=False)


def test_plots_write_pngs(tmp_path, setup):
    from fxsparse.plots import plot_activation_ratio, plot_ppl_vs_sparsity

    model, names, stats = setup
    per_layer = {"quantile": dict.fromkeys(names, 0.4), "norm": dict.fromkeys(names, 0.35)}
    a = plot_activation_ratio(per_layer, tmp_path / "a.png")
    b = plot_ppl_vs_sparsity({"quantile": [(0.3, 30.0), (0.5, 40.0)]}, tmp_path / "b.png",
                             dense_ppl=27.0)
    for p in (a, b):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_method_options():
    from fxsparse.cli import _method_options, _parser

    args = _parser().parse_args(["calibrate", "--out", "p.json", "--method", "mode",
                                 "--center", "kde"])
    assert _method_options(args) == {"center": "kde"}
    args = _parser().parse_args(["calibrate", "--out", "p.json", "--method", "pplp",
                                 "--ppl-p", "2"])
    assert _method_options(args) == {"p": 2.0}
    assert math.isclose(_parser().parse_args(["demo"]).ema_alpha, 0.2)


def test_refine_meets_targets_in_the_sparse_model():
    torch.compiler.reset()
    model = tiny_llama(layers=4)
    targets = {TargetScope(patterns=[r".*_proj"]): 0.5}
    dense = fxsparse.calibrate(model, CALIB, targets, progress=False)
    refined = fxsparse.calibrate(model, CALIB, targets, progress=False, refine=1)
    worst = [max(abs(v - 0.5) for v in measured(model, p, CALIB).values()) for p in (dense, refined)]
    assert worst[1] < 0.015 and worst[1] < worst[0] / 2, worst
    assert refined.meta["refined"] == 1
