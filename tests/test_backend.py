"""sparse_act end to end on a tiny random Llama: numerics, graph shape, shapes and caches."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import PlanError, SparsityPlan, TargetScope
from fxsparse.passes import linear_sites, lower_linears, match_linears
from fxsparse.reference import plan_hooks

from conftest import calibrated_tiny_llama, tiny_llama, token_batches


@pytest.fixture(scope="module")
def model_and_plan():
    return calibrated_tiny_llama(6)


def lowered_ops(record):
    return [d for g in record for d in g["decisions"]]


def test_logits_match_eager_hooks_and_graph_has_exactly_the_planned_ops(model_and_plan):
    model, plan = model_and_plan
    assert len(plan.layers) == 14  # 7 projections x 2 blocks; lm_head ignored
    x = token_batches(1, batch=2, seq=20, seed=7)[0]
    record = []
    fast = torch.compile(model, backend="sparse_act", options={"plan": plan, "record": record},
                         fullgraph=True)
    with torch.no_grad():
        got = fast(x, use_cache=False).logits
        with plan_hooks(model, plan):
            want = model(x, use_cache=False).logits
        dense = model(x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - dense).abs().max() > 1e-3  # the plan really changed something
    decisions = lowered_ops(record)
    # 40 rows, a static count above the fused kernel's limit: every planned layer is its mask
    # as aten ops + linear (the one-row graphs keep the op: test_kv_cache_decode_matches_eager)
    lowered = sorted(d["name"] for d in decisions if d["op"] == "mask+linear")
    assert lowered == sorted(plan.layers)
    assert [d["name"] for d in decisions if d["op"] == "linear"] == ["lm_head"]
    code = record[0]["stages"]["lower"]
    assert "torch.ops.fxsparse" not in code
    assert code.count("torch._C._nn.linear") == 15
    assert code.count("torch.ops.aten.where") == 8  # per block: q/k/v, o, gate/up, down


def test_dynamic_shapes_and_no_recompile_per_length(model_and_plan):
    model, plan = model_and_plan
    torch._dynamo.utils.counters.clear()
    fast = torch.compile(model, backend="sparse_act", options={"plan": plan}, dynamic=True)
    with torch.no_grad():
        for seq in (5, 9, 17):
            x = token_batches(1, batch=1, seq=seq, seed=seq)[0]
            with plan_hooks(model, plan):
                want = model(x, use_cache=False).logits
            torch.testing.assert_close(fast(x, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_kv_cache_decode_matches_eager(model_and_plan):
    from transformers import DynamicCache

    model, plan = model_and_plan
    fast = torch.compile(model, backend="sparse_act", options={"plan": plan})
    prompt = token_batches(1, batch=1, seq=12, seed=3)[0]
    with torch.no_grad():
        outs = []
        for fn, hooks in ((fast, False), (model, True)):
            cache = DynamicCache()
            ctx = plan_hooks(model, plan) if hooks else torch.no_grad()
            with ctx:
                out = fn(prompt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                steps = [out.logits[:, -1]]
                for _ in range(3):
                    out = fn(nxt, past_key_values=out.past_key_values, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                    steps.append(out.logits[:, -1])
            outs.append(torch.stack(steps))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


class TwoCalls(nn.Module):
    """One linear called twice around a graph break, and a second linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        h = torch.relu(self.a(h))
        return self.b(h)


def test_graph_breaks_and_repeated_calls():
    torch.manual_seed(0)
    m = TwoCalls().eval()
    plan = fxsparse.calibrate(m, [torch.randn(32, 16) for _ in range(4)],
                              {TargetScope(names=["a", "b"]): 0.5}, progress=False)
    record = []
    fast = torch.compile(m, backend="sparse_act", options={"plan": plan, "record": record})
    x = torch.randn(5, 16)
    with torch.no_grad(), plan_hooks(m, plan):
        want = m(x)
    torch.testing.assert_close(fast(x), want)
    assert len(record) == 2  # the graph break splits the forward in two graphs
    names = [d["name"] for d in lowered_ops(record)]
    assert sorted(names) == ["a", "a", "b"]


def test_symbolic_trace_graph():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6)).eval()
    gm = torch.fx.symbolic_trace(m)
    gm = match_linears(gm)
    assert [s.name for _, s in linear_sites(gm)] == ["0", "2"]
    plan = SparsityPlan(layers={"2": fxsparse.LayerPlan(threshold=0.3, in_features=24,
                                                        out_features=6, center=0.05)})
    gm = lower_linears(gm, plan)
    x = torch.randn(7, 12)
    with torch.no_grad(), plan_hooks(m, plan):
        want = m(x)
    torch.testing.assert_close(gm(x), want)
    assert sum(n.target == torch.ops.fxsparse.threshold_linear.default
               for n in gm.graph.nodes) == 1


def test_zero_threshold_lowers_to_dense_linear():
    """τ <= 0 keeps every input (NaN too): the entry lowers to the exact dense layer, with the
    reason recorded; a negative channel scale can drop inputs, so that entry stays sparse."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).eval()
    plan = SparsityPlan(layers={
        "0": fxsparse.LayerPlan(threshold=0.0, in_features=8, out_features=16, center=0.3),
        "1": fxsparse.LayerPlan(threshold=0.0, in_features=16, out_features=4, channel_scale=[-1.0] * 16),
    })
    gm = lower_linears(match_linears(torch.fx.symbolic_trace(m)), plan)
    ops = {d["name"]: (d["op"], d["reason"]) for d in gm.meta["fxsparse_decisions"]}
    assert ops["0"] == ("linear", "threshold <= 0 drops nothing: dense is exact")
    assert ops["1"][0] == "fxsparse.threshold_linear"
    assert fxsparse.prepare_weights(m, plan, device_types=("cpu",)) == ["1"]  # "0" stays row-major
    x = torch.randn(5, 8)
    x[0, 3] = math.nan
    with torch.no_grad(), plan_hooks(m, plan):
        want = m(x)
    torch.testing.assert_close(gm(x), want, equal_nan=True)


def test_dense_when_faster_lowers_losing_layers_dense(monkeypatch):
    """A layer whose sparse GEMV measures slower than dense (faked here: CPU) runs dense, keeps its
    row-major weight and says why; ``dense_when_faster=False`` keeps every planned layer sparse."""
    from fxsparse import dispatch

    asked = []

    def fake_pays(n, k, dtype, device, sparsity):
        asked.append((n, k, sparsity))
        return (False, (5.0, 8.0)) if n == 4 else (True, (5.0, 3.0))

    monkeypatch.setattr(dispatch, "gemv_pays", fake_pays)  # the rule prepare_weights shares

    def model_and_plan():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).eval()
        plan = SparsityPlan(layers={
            "0": fxsparse.LayerPlan(threshold=0.3, in_features=8, out_features=16, target_sparsity=0.5),
            "1": fxsparse.LayerPlan(threshold=0.3, in_features=16, out_features=4, target_sparsity=0.5),
        })
        return m, plan

    m, plan = model_and_plan()
    gm = lower_linears(match_linears(torch.fx.symbolic_trace(m)), plan)
    ops = {d["name"]: (d["op"], d["reason"]) for d in gm.meta["fxsparse_decisions"]}
    assert ops["0"] == ("fxsparse.threshold_linear", "planned")
    assert ops["1"] == ("linear", "sparse GEMV slower than dense here: 8.0 vs 5.0 us at sparsity 0.50, "
                                  "N = 4 (dense_when_faster)")
    assert asked == [(16, 8, 0.5), (4, 16, 0.5)]
    x = torch.randn(3, 8)
    with torch.no_grad(), plan_hooks(m, SparsityPlan(layers={"0": plan.layers["0"]})):
        want = m(x)  # layer 0 thresholded, layer 1 dense
    torch.testing.assert_close(gm(x), want)
    assert fxsparse.prepare_weights(m, plan, device_types=("cpu",)) == ["0"]

    m, plan = model_and_plan()
    gm = lower_linears(match_linears(torch.fx.symbolic_trace(m)), plan, dense_when_faster=False)
    assert [d["op"] for d in gm.meta["fxsparse_decisions"]] == ["fxsparse.threshold_linear"] * 2
    assert fxsparse.prepare_weights(m, plan, device_types=("cpu",), dense_when_faster=False) == ["0", "1"]


def test_center_bias_is_folded_once():
    torch.manual_seed(0)
    lin = nn.Linear(10, 4)
    plan = SparsityPlan(layers={"": fxsparse.LayerPlan(threshold=0.2, in_features=10,
                                                       out_features=4, center=[0.1] * 10)})
    gm = lower_linears(match_linears(torch.fx.symbolic_trace(nn.Sequential(lin))), SparsityPlan(
        layers={"0": plan.layers[""]}))
    cbias = [b for n, b in gm.named_buffers() if "cbias" in n]
    assert len(cbias) == 1
    torch.testing.assert_close(cbias[0], F.linear(torch.full((10,), 0.1), lin.weight))


def test_plan_shape_mismatch_is_a_clear_error():
    m = TwoCalls().eval()
    plan = SparsityPlan(layers={"b": fxsparse.LayerPlan(threshold=0.1, in_features=16,
                                                        out_features=9)})
    fast = torch.compile(m, backend="sparse_act", options={"plan": plan})
    with pytest.raises(Exception, match="layer 'b'.*out_features=9"):
        fast(torch.randn(2, 16))


def test_bad_options():
    m = TwoCalls().eval()
    with pytest.raises(Exception, match="unknown option.*'plna'"):
        torch.compile(m, backend="sparse_act", options={"plna": 1})(torch.randn(2, 16))
    torch.compiler.reset()
    with pytest.raises(Exception, match="unknown mode"):
        torch.compile(m, backend="sparse_act", options={"mode": "fastest"})(torch.randn(2, 16))
    torch.compiler.reset()
    with pytest.raises(Exception, match="no plan file"):
        torch.compile(m, backend="sparse_act", options={"plan": "/nonexistent/plan.json"})(
            torch.randn(2, 16))
    torch.compiler.reset()
    with pytest.raises(Exception, match="'dense_when_faster' must be True or False"):
        torch.compile(m, backend="sparse_act", options={"dense_when_faster": "yes"})(torch.randn(2, 16))
    torch.compiler.reset()
    with pytest.raises(Exception, match="'emulate_precision_casts' must be True or False"):
        torch.compile(m, backend="sparse_act", options={"emulate_precision_casts": 1})(torch.randn(2, 16))


def test_no_plan_compiles_dense_and_debug_dir(tmp_path):
    m = TwoCalls().eval()
    fast = torch.compile(m, backend="sparse_act", options={"debug_dir": str(tmp_path)})
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x))
    assert sorted(p.name for p in tmp_path.iterdir())[:1] == ["graph001_input.py"] or \
        any(p.name.endswith("_input.py") for p in tmp_path.iterdir())


def test_backend_found_by_name_without_importing_fxsparse(tmp_path):
    code = (
        "import sys, torch\n"
        "m = torch.nn.Linear(4, 4)\n"
        "out = torch.compile(m, backend='sparse_act', options={'inductor': False})(torch.randn(2, 4))\n"
        "assert out.shape == (2, 4)\n"
        "assert 'fxsparse' in sys.modules  # loaded through the entry point, not by us\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_fxsparse_compile_and_prepare_weights(model_and_plan):
    model, plan = model_and_plan
    # CPU weights stay as they are; asking for CPU conversion makes them column-major in place
    assert fxsparse.prepare_weights(model, plan) == []
    m2 = tiny_llama()
    ids_before = {n: id(p) for n, p in m2.named_parameters()}
    done = fxsparse.prepare_weights(m2, plan, device_types=("cpu",))
    assert sorted(done) == sorted(plan.layers)
    w = m2.model.layers[0].mlp.down_proj.weight
    assert w.stride() == (1, w.shape[0]) and ids_before == {n: id(p) for n, p in m2.named_parameters()}
    x = token_batches(1, batch=1, seq=10, seed=11)[0]
    fast = fxsparse.compile(m2, plan)
    with torch.no_grad(), plan_hooks(model, plan):
        want = model(x, use_cache=False).logits
    torch.testing.assert_close(fast(x, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(PlanError, match="another model"):
        fxsparse.compile(tiny_llama(layers=3), plan)


class _TiedLM(nn.Module):
    def __init__(self, one_parameter: bool):
        super().__init__()
        self.embed, self.proj = nn.Embedding(32, 16), nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 32, bias=False)
        # HF ties by sharing the Parameter; a distinct Parameter on the same storage ties too
        self.lm_head.weight = self.embed.weight if one_parameter else nn.Parameter(self.embed.weight.data)

    def forward(self, ids):
        return self.lm_head(self.proj(self.embed(ids)))


@pytest.mark.parametrize("one_parameter", [True, False])
def test_prepare_weights_leaves_tied_weights_row_major(one_parameter, caplog):
    """A planned lm_head tied to the token embedding keeps its row-major weight, and says why:
    converting it would make the embedding column-major too (safetensors refuses to save it)
    or untie the two."""
    import logging

    m = _TiedLM(one_parameter)
    plan = SparsityPlan(layers={n: fxsparse.LayerPlan(threshold=0.1, in_features=16, out_features=o,
                                                      target_sparsity=0.3)
                                for n, o in (("proj", 16), ("lm_head", 32))},
                        model=SparsityPlan.fingerprint(m))
    with caplog.at_level(logging.INFO, logger="fxsparse"):
        assert fxsparse.prepare_weights(m, plan, device_types=("cpu",)) == ["proj"]
    assert m.proj.weight.stride() == (1, 16)  # untied layers are still converted
    assert m.embed.weight.is_contiguous() and m.lm_head.weight.data_ptr() == m.embed.weight.data_ptr()
    assert "lm_head.weight left row-major: its memory is shared with embed.weight" in caplog.text
    ids = torch.randint(0, 32, (1, 3))
    with torch.no_grad(), plan_hooks(m, plan):
        want = m(ids)
    torch.testing.assert_close(fxsparse.compile(m, plan, inductor=False)(ids), want)


def test_centered_and_scaled_plan_through_inductor(model_and_plan):
    """Centers, channel scales and the folded center bias are graph constants Inductor must take."""
    model, plan = model_and_plan
    data = plan.to_dict()
    for name, lp in data["layers"].items():
        k = lp["in_features"]
        lp["center"] = [0.01 * ((i % 5) - 2) for i in range(k)] if "down" in name else 0.02
        lp["channel_scale"] = [1.0 + 0.1 * (i % 3) for i in range(k)]
    centered = SparsityPlan.from_dict(data)
    x = token_batches(1, batch=1, seq=12, seed=13)[0]
    fast = torch.compile(model, backend="sparse_act", options={"plan": centered})
    with torch.no_grad():
        got = fast(x, use_cache=False).logits
        with plan_hooks(model, centered):
            want = model(x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefill_kinds_of_topk_layers_are_rejected_not_ignored():
    from fxsparse.passes import lower_linears, match_linears

    m = nn.Sequential(nn.Linear(8, 4))
    plan = SparsityPlan(layers={"0": fxsparse.LayerPlan(threshold=0.0, in_features=8, out_features=4,
                                                        method="topk", target_sparsity=0.5,
                                                        prefill="2:4")})
    with pytest.raises(PlanError, match="'0'.*prefill='2:4' is not supported for method 'topk'"):
        lower_linears(match_linears(torch.fx.symbolic_trace(m)), plan)


@pytest.mark.parametrize("source", [
    "L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']",  # torch <= 2.12
    "L['args'][0]._modules['model']._modules['layers']._modules['0']._modules['mlp']",  # torch 2.13
    "L['self'].model.layers[0]._modules['mlp']",
])
def test_module_path_strips_the_root(source):
    from fxsparse.passes.match import module_path

    assert module_path(source) == "model.layers.0.mlp"


def test_backend_warns_when_the_plan_does_not_fit_the_graph():
    """torch.compile's backend sees graphs, not the model, so it cannot refuse a plan made for
    another model; it warns when the graph's linears are not that model's, or are ambiguous."""
    import warnings

    from fxsparse import LayerPlan

    model = tiny_llama()
    ids = token_batches(1)[0]
    other = SparsityPlan(layers={"h.0.mlp.c_fc": LayerPlan(threshold=0.1, in_features=48, out_features=96)},
                         model={"class": "GPT2LMHeadModel", "linears": {"h.0.mlp.c_fc": [96, 48]}})
    own = fxsparse.calibrate(model, token_batches(2), {TargetScope(patterns=[r".*mlp\..*"]): 0.5},
                             progress=False)
    cases = [(model, ids, other, "plan made for another model"), (model, ids, own, None),
             (model.model.layers[0].mlp, torch.randn(1, 3, 48), own, "matches 2 plan entries")]
    for module, inp, plan, message in cases:
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.compile(module, backend="sparse_act", options={"plan": plan, "inductor": False})(inp)
        found = [str(w.message) for w in caught if "sparse_act:" in str(w.message)]
        if message is None:
            assert not found
        else:
            assert found and message in found[0]


def test_plan_applies_to_a_compiled_module_holding_the_model():
    """A wrapper around the model (its graphs name ``model.model.layers...``) takes the plan's
    entries by their ending, without a warning."""
    import warnings

    class Wrapper(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids, use_cache=False).logits

    model = tiny_llama()
    plan = fxsparse.calibrate(model, token_batches(2), {TargetScope(patterns=[r".*mlp\..*"]): 0.5},
                              progress=False)
    torch._dynamo.reset()
    record = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(Wrapper(model), backend="sparse_act",
                      options={"plan": plan, "inductor": False, "record": record})(token_batches(1)[0])
    assert not [w for w in caught if "sparse_act:" in str(w.message)]
    ops = {d["name"]: d["op"] for g in record for d in g["decisions"]}
    assert ops["model.model.layers.0.mlp.down_proj"] != "linear"
