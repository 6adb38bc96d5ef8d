"""calibrate(): targets hit on calibration and fresh data; every input kind; clear errors."""

import pytest
import torch

import fxsparse
from fxsparse import IgnoredScope, PlanError, ScopeError, TargetScope

from conftest import tiny_llama, token_batches


def measured_sparsity(model, plan, batches):
    """Exact dropped fraction per planned layer, counted by hooks (independent of observers)."""
    from fxsparse.kernels import keep_mask_reference

    counts = {name: [0, 0] for name in plan.layers}
    modules = dict(model.named_modules())
    handles = []
    for name, lp in plan.layers.items():
        def hook(_m, args, name=name, lp=lp):
            keep = keep_mask_reference(args[0], lp.threshold, lp.center_tensor(), lp.scale_tensor())
            counts[name][0] += int((~keep).sum())
            counts[name][1] += keep.numel()
        handles.append(modules[name].register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b, use_cache=False)
    for h in handles:
        h.remove()
    return {name: d / n for name, (d, n) in counts.items()}


TARGETS = {TargetScope(patterns=[r".*mlp\.(up|gate)_proj"]): 0.4,
           TargetScope(patterns=[r".*mlp\.down_proj"]): 0.5,
           TargetScope(patterns=[r".*self_attn\.[qkvo]_proj"]): 0.25}


def test_targets_hit_on_calibration_and_fresh_data():
    model = tiny_llama()
    calib = token_batches(8, batch=4, seq=32, seed=1)
    fresh = token_batches(8, batch=4, seq=32, seed=2)
    plan = fxsparse.calibrate(model, calib, TARGETS, IgnoredScope(names=["lm_head"]),
                              progress=False)
    on_calib = measured_sparsity(model, plan, calib)
    on_fresh = measured_sparsity(model, plan, fresh)
    for name, lp in plan.layers.items():
        assert abs(on_calib[name] - lp.target_sparsity) <= 0.005, name
        assert abs(on_fresh[name] - lp.target_sparsity) <= 0.02, name
        assert abs(lp.calibrated_sparsity - on_calib[name]) <= 0.005, name
    assert plan.skipped["lm_head"] == "ignored_scope"
    assert plan.model["class"] == "LlamaForCausalLM"
    assert plan.meta["calibration_tokens"] == 8 * 4 * 32


def test_dataset_kinds_give_the_same_plan():
    from datasets import Dataset

    model = tiny_llama()
    rows = token_batches(4, batch=1, seq=16, seed=5)
    targets = {TargetScope(patterns=[r".*down_proj"]): 0.5}
    a = fxsparse.calibrate(model, rows, targets, progress=False)
    b = fxsparse.calibrate(model, [{"input_ids": r, "attention_mask": torch.ones_like(r)}
                                   for r in rows], targets, progress=False)
    c = fxsparse.calibrate(model, Dataset.from_dict({"input_ids": [r[0].tolist() for r in rows]}),
                           targets, progress=False)
    for name in a.layers:
        assert a.layers[name].threshold == b.layers[name].threshold == c.layers[name].threshold


def test_progress_bar_and_max_batches(capsys):
    model = tiny_llama()
    fxsparse.calibrate(model, token_batches(5), {TargetScope(names=["lm_head"]): 0.3},
                       max_batches=2, progress=True)
    assert "calibrating" in capsys.readouterr().err


def test_errors():
    model = tiny_llama()
    data = token_batches(2)
    with pytest.raises(ScopeError, match="matches no linear layer"):
        fxsparse.calibrate(model, data, {TargetScope(patterns=["mlp"]): 0.3}, progress=False)
    with pytest.raises(ValueError, match="unknown calibration method 'median'"):
        fxsparse.calibrate(model, data, {TargetScope(names=["lm_head"]): 0.3}, method="median",
                           progress=False)
    with pytest.raises(TypeError, match="calibration item 0"):
        fxsparse.calibrate(model, ["some text"], {TargetScope(names=["lm_head"]): 0.3},
                           progress=False)
    with pytest.raises(RuntimeError, match="recorded nothing"):
        fxsparse.calibrate(model, [], {TargetScope(names=["lm_head"]): 0.3}, progress=False)


class _Tok:
    """Tokenizer stand-in: one token per character, its code point."""

    def __call__(self, text, return_tensors=None):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]]))


def test_token_chunks_spread_samples_the_whole_text():
    from fxsparse.data import token_chunks

    text = "".join(chr(65 + i // 10) for i in range(100))  # ten 10-token "documents" A..J
    first = token_chunks(_Tok(), text, 10, 3)
    spread = token_chunks(_Tok(), text, 10, 3, spread=True)
    assert [chr(int(w[0, 0])) for w in first] == ["A", "B", "C"]
    assert [chr(int(w[0, 0])) for w in spread] == ["A", "D", "G"]  # evenly over the text
    assert all(w.shape == (1, 10) for w in spread)
    assert len(token_chunks(_Tok(), text, 10, 50, spread=True)) == 10  # never more than there are
    assert [chr(int(w[0, 0])) for w in token_chunks(_Tok(), text, 10, spread=True)] == list("ABCDEFGHIJ")
    with pytest.raises(ValueError, match="fewer than one window"):
        token_chunks(_Tok(), "abc", 10, spread=True)


def test_cli_calib_spread_option():
    from fxsparse.cli import _parser

    assert _parser().parse_args(["calibrate", "--out", "p.json", "--calib-spread"]).calib_spread
    assert not _parser().parse_args(["calibrate", "--out", "p.json"]).calib_spread


def test_calibration_leaves_no_shape_history_on_the_model():
    """Calibrating on windows of another shape must not make the user's next compile of the
    model trace its sizes as dynamic (Dynamo's automatic dynamic shapes): a static two-row bf16
    step keeps the fused kernel's op instead of a mask left to Inductor."""
    model = tiny_llama().to(torch.bfloat16)
    plan = fxsparse.calibrate(model, token_batches(3, batch=1, seq=16),
                              {TargetScope(patterns=[r".*\.layers\..*"]): 0.5}, progress=False)
    record = []
    fast = torch.compile(model, backend="sparse_act", options={"plan": plan, "record": record,
                                                               "inductor": False})
    with torch.no_grad():
        fast(torch.randint(0, 96, (2, 1)), use_cache=False)
    ops = {d["op"] for g in record for d in g["decisions"] if d["name"] in plan.layers}
    assert "mask+linear" not in ops and "fxsparse.threshold_linear_group" in ops, ops


@pytest.mark.parametrize("method,refine", [("quantile", 1), ("attribution", 0)])
def test_one_shot_iterator_of_batches_feeds_every_pass(method, refine):
    """A generator is read once: refine's pass and the histogram pass after attribution's
    gradient pass see the same batches as the first pass, not an exhausted iterator."""
    model = tiny_llama()
    batches = token_batches(4, batch=1, seq=16, seed=3)
    targets = {TargetScope(patterns=[r".*mlp\.down_proj"]): 0.5}
    opts = dict(method=method, refine=refine, max_batches=3, progress=False)
    want = fxsparse.calibrate(model, batches, targets, **opts)
    it = iter(batches)
    got = fxsparse.calibrate(model, it, targets, **opts)
    assert {n: lp.threshold for n, lp in got.layers.items()} == \
        {n: lp.threshold for n, lp in want.layers.items()}
    assert next(it) is batches[3]  # read no further than max_batches


class _MustNotRun(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 6), torch.nn.Linear(6, 8)

    def forward(self, x):
        raise AssertionError("calibrate ran the model before checking its arguments")


@pytest.mark.parametrize("layer,kwargs,error,match", [
    ("a", dict(method="topk", prefill="2:4"), PlanError,
     r"layer 'a': prefill='2:4' is not supported for method 'topk'"),
    ("a", dict(method="topk", prefill="dense"), PlanError, r"prefill='dense' is not supported"),
    ("a", dict(method="topk", prefill={TargetScope(names=["a"]): "dense"}), PlanError, "not supported"),
    ("b", dict(prefill="2:4"), PlanError, "needs in_features divisible by 4"),
    ("a", dict(prefill={TargetScope(names=["b"]): "dense"}), ValueError, "matches no calibrated layer"),
    ("a", dict(prefill="2:3"), PlanError, "prefill must be one of"),
    ("a", dict(prefill="dense", decode_rows=-1), PlanError, "decode_rows must be an integer >= 0"),
    ("a", dict(method="fat", epsilon=-0.1), PlanError, "threshold must be a number >= 0"),
    ("a", dict(center="median"), TypeError, r"unknown option\(s\) for method 'quantile'"),
    ("a", dict(method="mode", center="mean"), ValueError, "center must be one of"),
    ("a", dict(quantile_ema=True, ema_rule="ewm"), ValueError, "rule must be one of"),
])
def test_bad_arguments_fail_before_the_model_runs(layer, kwargs, error, match):
    """Argument errors the plan would only find after the whole calibration pass."""
    with pytest.raises(error, match=match):
        fxsparse.calibrate(_MustNotRun(), [torch.randn(2, 8)], {TargetScope(names=[layer]): 0.5},
                           progress=False, **kwargs)


def test_ignoring_every_target_is_an_error():
    model = tiny_llama()
    with pytest.raises(ScopeError, match="ignored_scope leaves none"):
        fxsparse.calibrate(model, token_batches(1), {TargetScope(patterns=[r".*mlp\..*"]): 0.5},
                           IgnoredScope(patterns=[r".*mlp\..*"]), progress=False)


def test_a_torch_compile_wrapper_is_the_model_it_holds():
    """calibrate / explain / evaluate of ``torch.compile(model)`` use the module inside: plan
    names without ``_orig_mod.``, and the plan fits the model itself."""
    from fxsparse.evaluation import evaluate

    model = tiny_llama()
    wrapped = torch.compile(model)
    plan = fxsparse.calibrate(wrapped, token_batches(2), {TargetScope(patterns=[r".*mlp\.up_proj"]): 0.5},
                              progress=False)
    assert sorted(plan.layers) == [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
    plan.check_model(model)
    report = fxsparse.explain(wrapped, token_batches(1)[0], plan=plan)
    assert any(r.name == "model.layers.0.mlp.up_proj" for r in report.rows)
    ids = token_batches(1, batch=1, seq=40)[0][0]
    assert evaluate(wrapped, ids, plan, window=16, progress=False).sparse_ppl > 0


def test_padding_is_not_calibration_data():
    """Right padding (attention_mask 0) leaves the real tokens' activations as they are under
    causal attention; the observers must skip the padded positions, so the plan is the same."""
    model = tiny_llama()
    ids = token_batches(2, batch=1, seq=16)
    pad = torch.zeros(1, 8, dtype=torch.long)
    plain = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    padded = [{"input_ids": torch.cat([x, pad], 1),
               "attention_mask": torch.cat([torch.ones_like(x), torch.zeros_like(pad)], 1)} for x in ids]
    scope = {TargetScope(patterns=[r".*mlp\..*"]): 0.5}
    a = fxsparse.calibrate(model, plain, scope, progress=False)
    b = fxsparse.calibrate(model, padded, scope, progress=False)
    assert b.meta["calibration_tokens"] == a.meta["calibration_tokens"] == 32
    for name, lp in a.layers.items():
        assert b.layers[name].threshold == pytest.approx(lp.threshold, rel=1e-6), name
