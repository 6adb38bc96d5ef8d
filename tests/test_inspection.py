"""explain(), evaluate() and the CLI's error paths on a tiny random Llama."""

import json

import pytest
import torch

import fxsparse
from fxsparse import IgnoredScope, SparsityPlan, TargetScope
from fxsparse.evaluation import evaluate, sliding_windows

from conftest import tiny_llama, token_batches


@pytest.fixture(scope="module")
def model_plan():
    torch.compiler.reset()
    model = tiny_llama()
    plan = fxsparse.calibrate(model, token_batches(4, seq=32),
                              {TargetScope(patterns=[r".*mlp\..*_proj"]): 0.5},
                              IgnoredScope(names=["lm_head"]), progress=False)
    return model, plan


def test_explain_reports_graphs_table_and_reasons(model_plan, tmp_path):
    model, plan = model_plan
    x = token_batches(1, batch=1, seq=32, seed=9)[0]
    report = fxsparse.explain(model, x, plan=plan, dump_dir=tmp_path)
    rows = {r.name: r for r in report.rows}
    assert len(rows) == 15
    for name in plan.layers:  # 32 rows per call: the mask is left to Inductor (lower.py)
        assert rows[name].op == "mask+linear"
        assert abs(rows[name].sparsity - 0.5) < 0.15  # one short input: near the target
        assert rows[name].sparse_bytes < rows[name].dense_bytes
    one_token = {r.name: r for r in fxsparse.explain(model, x[:, :1], plan=plan).rows}
    for name in plan.layers:  # decode: gate/up share their input (one mask, one launch); down
        down = name.endswith("down_proj")  # computes its input silu(gate) * up itself
        assert one_token[name].op == "fxsparse.threshold_linear" + ("_act" if down else "_group")
    assert one_token["model.layers.0.mlp.gate_proj"].kernel.endswith("one mask and launch with up_proj")
    assert "silu(a) * b" in one_token["model.layers.0.mlp.down_proj"].kernel
    dense_prefill = SparsityPlan.from_dict(plan.to_dict()).set_prefill("dense")
    decode_rows = {r.name: r for r in fxsparse.explain(model, x[:, :1], plan=dense_prefill).rows}
    gate = decode_rows["model.layers.0.mlp.gate_proj"]  # grouped in decode whatever the prefill
    assert gate.op == "fxsparse.threshold_linear_group"
    assert gate.kernel.endswith("one mask and launch with up_proj"), gate.kernel
    assert rows["lm_head"].reason == "ignored_scope"
    assert rows["model.layers.0.self_attn.q_proj"].reason == "no TargetScope matches it"
    stages = report.graphs[0]["stages"]
    assert set(stages) == {"input", "observe", "lower", "group", "fuse_act", "accumulate"}
    assert "fxsparse_observer_0" in stages["observe"]
    assert "torch.ops.aten.where" in stages["lower"] and "where" not in stages["input"]
    text = report.table()
    assert "6 of 15 linears sparsified" in text
    assert (tmp_path / "table.txt").read_text().strip() == text
    assert len(json.loads((tmp_path / "layers.json").read_text())) == 15
    assert any(p.name.endswith("_lower.py") for p in tmp_path.iterdir())


def test_sliding_windows_score_each_token_once():
    ids = torch.arange(23)
    scored = []
    for chunk, skip in sliding_windows(ids, window=8, stride=5):
        lo = max(skip - 1, 0)
        scored += chunk[0, lo + 1:].tolist()
    assert scored == list(range(1, 23))


def test_evaluate_dense_vs_sparse(model_plan):
    model, plan = model_plan
    ids = token_batches(1, batch=1, seq=100, seed=4)[0][0]
    res = evaluate(model, ids, plan, window=32, stride=16, progress=False)
    assert res.tokens == 99
    assert res.sparse_ppl != res.dense_ppl and 0 < res.agreement <= 1
    assert set(res.layers) == set(plan.layers)
    for st in res.layers.values():
        assert 0.3 < st["sparsity"] < 0.7 and st["token_std"] > 0
    dense_only = evaluate(model, ids, None, window=32, progress=False)
    assert dense_only.sparse_ppl is None
    assert dense_only.dense_ppl == pytest.approx(res.dense_ppl, rel=0.05)
    assert "perplexity dense" in res.table(plan)


def test_evaluate_scores_with_decode_masks_whatever_the_prefill(model_plan):
    """A dense-prefill plan costs what its decode masks cost: evaluate must not score it dense."""
    model, plan = model_plan
    ids = token_batches(1, batch=1, seq=70, seed=5)[0][0]
    threshold = evaluate(model, ids, plan, window=32, progress=False, engine="hooks")
    dense_prefill = SparsityPlan.from_dict(plan.to_dict()).set_prefill("dense")
    res = evaluate(model, ids, dense_prefill, window=32, progress=False, engine="hooks")
    assert res.sparse_ppl == pytest.approx(threshold.sparse_ppl) and res.sparse_ppl != res.dense_ppl
    assert all(lp.prefill == "dense" for lp in dense_prefill.layers.values())  # not mutated


def test_cli_errors_are_clear(tmp_path, capsys):
    from fxsparse.cli import main

    rc = main(["evaluate", "--plan", str(tmp_path / "missing.json"), "--model", str(tmp_path)])
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_logging_switch(model_plan, caplog):
    import logging

    model, plan = model_plan
    fxsparse.set_logs("debug")
    try:
        with caplog.at_level(logging.DEBUG, logger="fxsparse"):
            torch.compile(model, backend="sparse_act", options={"plan": plan, "inductor": False})(
                token_batches(1, batch=1, seq=8)[0], use_cache=False)
    finally:
        fxsparse.set_logs(None)
    text = caplog.text
    assert "6 of 15 linear(s) lowered" in text and "after lower" in text


def test_cli_generate_checks_device_before_loading(tmp_path, capsys, model_plan):
    from fxsparse.cli import main

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error")
    _, plan = model_plan
    plan.save(tmp_path / "plan.json")
    rc = main(["generate", "--plan", str(tmp_path / "plan.json"), "--device", "cuda"])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err


def test_explain_and_hooks_know_topk_layers(model_plan):
    from fxsparse.reference import plan_hooks

    model, plan = model_plan
    data = plan.to_dict()
    for lp in data["layers"].values():
        lp.update(method="topk", threshold=0.0, target_sparsity=0.25)
    topk = fxsparse.SparsityPlan.from_dict(data)
    x = token_batches(1, batch=1, seq=16, seed=21)[0]
    rows = {r.name: r for r in fxsparse.explain(model, x, plan=topk).rows}
    for name in topk.layers:
        assert rows[name].op == "fxsparse.topk_linear"
        assert abs(rows[name].sparsity - 0.25) < 0.02  # exact per row, up to rounding of k
    fast = torch.compile(model, backend="sparse_act", options={"plan": topk})
    with torch.no_grad():
        got = fast(x, use_cache=False).logits
        with plan_hooks(model, topk):
            want = model(x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_explain_counts_layers_lowered_dense_as_not_sparsified(monkeypatch):
    """A planned layer the lower pass makes a plain linear (a threshold that drops nothing, or
    a sparse GEMV slower than dense: faked here) saves no bytes and is not 'sparsified'."""
    from torch import nn

    from fxsparse import dispatch

    monkeypatch.setattr(dispatch, "gemv_pays", lambda n, k, dtype, device, s: (n != 32, (5.0, 8.0)))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 64)).eval()
    plan = SparsityPlan(layers={
        name: fxsparse.LayerPlan(threshold=t, in_features=i, out_features=o, target_sparsity=0.5)
        for name, t, i, o in (("0", 0.0, 64, 64), ("1", 0.5, 64, 32), ("2", 0.5, 32, 64))},
        model=SparsityPlan.fingerprint(m))
    report = fxsparse.explain(m, torch.randn(1, 64), plan=plan)
    rows = {r.name: r for r in report.rows}
    assert [rows[n].op for n in "012"] == ["linear", "linear", "fxsparse.threshold_linear"]
    assert rows["1"].sparsity > 0.2  # what the threshold would drop; the layer drops nothing
    assert [rows[n].dense_bytes - rows[n].sparse_bytes > 0 for n in "012"] == [False, False, True]
    assert [rows[n].runs_dense for n in "012"] == [True, True, False]
    total, saved = (sum(r.dense_bytes for r in report.rows),
                    rows["2"].dense_bytes - rows["2"].sparse_bytes)
    assert report.table().splitlines()[-1] == (
        "1 of 3 linears sparsified (2 planned layers run dense: threshold <= 0 drops nothing (1), "
        "sparse GEMV slower than dense here (1)); expected weight bytes per decode step "
        f"{total / 1e6:.1f} MB -> {(total - saved) / 1e6:.1f} MB")


def test_explain_counts_tied_weight_bytes_at_their_dtype():
    """A tied lm_head (the embedding's Parameter) is listed by ``named_parameters`` only under
    the embedding's name; its row must still count 4 bytes per float32 element."""
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plan = fxsparse.calibrate(model, token_batches(2), {TargetScope(patterns=[r".*mlp\.up_proj"]): 0.5},
                              progress=False)
    report = fxsparse.explain(model, token_batches(1)[0], plan=plan)
    (row,) = [r for r in report.rows if r.name == "lm_head"]
    assert row.dense_bytes == 96 * 48 * 4


def test_evaluate_rejects_zero_windows():
    model = tiny_llama()
    with pytest.raises(ValueError, match="max_windows must be at least 1"):
        evaluate(model, token_batches(1, batch=1, seq=40)[0][0], window=16, max_windows=0, progress=False)
