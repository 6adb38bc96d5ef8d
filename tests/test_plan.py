import json

import pytest

from fxsparse import LayerPlan, PlanError, SparsityPlan

from conftest import tiny_llama


def make_plan(model):
    layers = {
        "model.layers.0.mlp.down_proj": LayerPlan(threshold=0.01, in_features=96, out_features=48,
                                                  target_sparsity=0.5),
        "model.layers.1.mlp.up_proj": LayerPlan(threshold=0.2, in_features=48, out_features=96,
                                                center=[0.1] * 48, channel_scale=[1.0] * 48),
    }
    return SparsityPlan(layers=layers, model=SparsityPlan.fingerprint(model),
                        skipped={"lm_head": "ignored_scope"})


def test_round_trip(tmp_path):
    model = tiny_llama()
    plan = make_plan(model)
    path = plan.save(tmp_path / "sub" / "plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == "fxsparse.plan" and data["version"] == 1
    assert data["model"]["linears"]["lm_head"] == [96, 48]
    back = SparsityPlan.load(path, model)
    assert back.layers == plan.layers and back.skipped == plan.skipped
    assert not list(tmp_path.glob("sub/.*tmp")), "temp file left behind"


def test_save_failure_keeps_old_file(tmp_path):
    model = tiny_llama()
    plan = make_plan(model)
    path = plan.save(tmp_path / "plan.json")
    before = path.read_text()
    plan.layers["model.layers.0.mlp.down_proj"].threshold = float("nan")
    with pytest.raises(PlanError, match="down_proj.*threshold"):
        plan.save(path)
    assert path.read_text() == before


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d["layers"]["model.layers.0.mlp.down_proj"].update(in_features=7),
     "down_proj.*in_features=7"),
    (lambda d: d["layers"]["model.layers.0.mlp.down_proj"].update(thresh=1), "unknown keys"),
    (lambda d: d["layers"]["model.layers.1.mlp.up_proj"].update(center=[0.0] * 3),
     "up_proj.*center has 3 entries"),
    (lambda d: d["layers"]["model.layers.1.mlp.up_proj"].update(channel_scale=[-1.0] * 48),
     "negative"),
    (lambda d: d["layers"].update({"model.layers.9.mlp.up_proj": dict(
        d["layers"]["model.layers.1.mlp.up_proj"])}), "layers.9.*not a linear layer"),
])
def test_load_errors_name_the_problem(tmp_path, mutate, message):
    model = tiny_llama()
    data = make_plan(model).to_dict()
    mutate(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        SparsityPlan.load(path, model)


def test_malformed_json_and_missing_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"format": "fxsparse.plan", ')
    with pytest.raises(PlanError, match="malformed JSON"):
        SparsityPlan.load(path)
    with pytest.raises(PlanError, match="no plan file"):
        SparsityPlan.load(tmp_path / "missing.json")


def test_plan_for_another_model():
    plan = make_plan(tiny_llama())
    bigger = tiny_llama(layers=3)
    with pytest.raises(PlanError, match="layers.2.*another model"):
        plan.check_model(bigger)


def test_resolve_suffix():
    plan = make_plan(tiny_llama())
    assert plan.resolve("layers.0.mlp.down_proj") == "model.layers.0.mlp.down_proj"
    assert plan.resolve("mlp.down_proj") == "model.layers.0.mlp.down_proj"
    assert plan.resolve("down_proj.x") is None


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_saved_plan_gets_the_usual_mode(tmp_path, umask):
    import os
    import stat

    plan = make_plan(tiny_llama())
    old = os.umask(umask)
    try:
        path = plan.save(tmp_path / "plan.json")
        path = plan.save(path)  # over an existing file too
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert not list(tmp_path.glob(".*tmp")), "temp file left behind"


UP = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["layers"][UP].update(target_sparsity="0.5"), "up_proj.*target_sparsity"),
    (lambda d: d["layers"][UP].update(target_sparsity=True), "up_proj.*target_sparsity"),
    (lambda d: d["layers"][UP].update(method="bogus"), "up_proj.*method must be one of"),
    (lambda d: d["layers"][UP].update(method="topK"), "up_proj.*method must be one of"),
    (lambda d: d["layers"][UP].update(method=123), "up_proj.*method must be one of"),
    (lambda d: d["layers"][UP].update(calibrated_sparsity="abc"), "up_proj.*calibrated_sparsity"),
    (lambda d: d["layers"][UP].update(calibrated_sparsity=float("nan")), "up_proj.*calibrated_sparsity"),
    (lambda d: d.update(skipped=["a", "b"]), "'skipped' must be an object"),
    (lambda d: d.update(skipped={"lm_head": 3}), "'skipped' maps layer names to reasons"),
    (lambda d: d.update(model="xy"), "'model' must be an object"),
    (lambda d: d["model"].update(linears=["a"]), "'model.linears' must be an object"),
    (lambda d: d.update(meta="xy"), "'meta' must be an object"),
    (lambda d: d.update(version=True), "version True is not supported"),
    (lambda d: d.update(version=1.0), "version 1.0 is not supported"),
])
def test_malformed_fields_raise_plan_error(mutate, message):
    data = make_plan(tiny_llama()).to_dict()
    mutate(data)
    with pytest.raises(PlanError, match=message):
        SparsityPlan.from_dict(data)


def test_every_calibration_method_is_a_valid_layer_method():
    from fxsparse.methods import METHODS
    from fxsparse.plan import LAYER_METHODS

    assert set(LAYER_METHODS) == set(METHODS)
    data = make_plan(tiny_llama()).to_dict()
    for m in METHODS:
        data["layers"][UP].update(method=m, target_sparsity=0.5)
        assert SparsityPlan.from_dict(data).layers[UP].method == m


def test_topk_without_target_and_unknown_top_level_keys_are_rejected():
    lp = LayerPlan(threshold=0.0, in_features=8, out_features=4, method="topk")
    with pytest.raises(PlanError, match="'topk' needs target_sparsity"):
        lp.validate("fc")
    d = SparsityPlan(layers={"fc": LayerPlan(threshold=0.1, in_features=8, out_features=4)}).to_dict()
    SparsityPlan.from_dict(d)
    with pytest.raises(PlanError, match="unknown top-level keys"):
        SparsityPlan.from_dict({**d, "extra": 1})
