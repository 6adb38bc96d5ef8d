"""Prefill kinds: plan fields, fxsparse::prefill_linear, lowering, crossover cache, 2:4."""

import json
import logging
import math
import os

import torch

# Without a GPU the Triton kernels run in the interpreter (set before triton is first imported).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.library import opcheck  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse import IgnoredScope, LayerPlan, PlanError, SparsityPlan, TargetScope  # noqa: E402
from fxsparse.kernels import crossover as X  # noqa: E402
from fxsparse.kernels import prune24 as P  # noqa: E402
from fxsparse.kernels.prefill_linear import branch, prefill_linear  # noqa: E402
from fxsparse.reference import plan_hooks  # noqa: E402

from conftest import tiny_llama, token_batches  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NEVER = X.NEVER
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
MLP = {TargetScope(patterns=[r".*mlp\..*_proj"]): 0.5}


# -- plan -------------------------------------------------------------------------------------


def _plan(**kw) -> SparsityPlan:
    base = dict(threshold=0.1, in_features=8, out_features=4)
    return SparsityPlan(layers={"0": LayerPlan(**{**base, **kw})})


def test_plan_round_trip_and_old_files_load(tmp_path):
    plan = _plan(prefill="2:4", decode_rows=8, center=0.1)
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["layers"]["0"]["prefill"] == "2:4"
    assert data["layers"]["0"]["decode_rows"] == 8
    assert SparsityPlan.load(path).layers == plan.layers
    del data["layers"]["0"]["decode_rows"], data["layers"]["0"]["prefill"]  # a pre-issue-7 file
    path.write_text(json.dumps(data))
    old = SparsityPlan.load(path).layers["0"]
    assert (old.prefill, old.decode_rows) == ("threshold", 16)


@pytest.mark.parametrize("fields, message", [
    (dict(prefill="4:8"), "'0'.*prefill must be one of"),
    (dict(decode_rows=-1), "'0'.*decode_rows must be an integer >= 0"),
    (dict(decode_rows=True), "'0'.*decode_rows"),
    (dict(decode_rows=2.5), "'0'.*decode_rows"),
    (dict(prefill="2:4", in_features=6, center=0.0), "'0'.*divisible by 4"),
    (dict(prefill="dense", method="topk", target_sparsity=0.5), "'0'.*not supported for method 'topk'"),
])
def test_bad_prefill_values_are_plan_errors(tmp_path, fields, message):
    data = _plan().to_dict()
    data["layers"]["0"].update(fields)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        SparsityPlan.load(path)


def test_set_prefill_is_all_or_nothing():
    plan = SparsityPlan(layers={
        "a": LayerPlan(threshold=0.1, in_features=8, out_features=4),
        "b": LayerPlan(threshold=0.0, in_features=8, out_features=4, method="topk", target_sparsity=0.5)})
    with pytest.raises(PlanError, match="'b'.*topk"):
        plan.set_prefill("2:4")
    assert plan.layers["a"].prefill == "threshold"
    plan.set_prefill("2:4", decode_rows=4, names=["a"])
    assert (plan.layers["a"].prefill, plan.layers["a"].decode_rows) == ("2:4", 4)
    with pytest.raises(PlanError, match="'zz' is not a layer"):
        plan.set_prefill("dense", names=["zz"])


def test_cli_prefill_options():
    from fxsparse.cli import _parser

    args = _parser().parse_args(["calibrate", "--out", "p.json", "--prefill", "2:4", "--decode-rows", "8"])
    assert (args.prefill, args.decode_rows) == ("2:4", 8)
    args = _parser().parse_args(["calibrate", "--out", "p.json"])
    assert (args.prefill, args.decode_rows) == ("threshold", 16)


# -- the op -----------------------------------------------------------------------------------


def test_branch_rule():
    assert [branch(r, 4, 10) for r in (0, 4, 5, 9, 10, 99)] == \
        ["threshold", "threshold", "dense", "dense", "2:4", "2:4"]
    assert branch(3, 4, 2) == "threshold" and branch(5, 4, 2) == "2:4"  # decode wins first
    assert branch(10**9, 16, NEVER) == "dense"


def _keep24_by_comparison(x: torch.Tensor, center) -> torch.Tensor:
    """2:4 keep mask by the 4x4 comparison (independent of the sort-based reference)."""
    d = x.float() - (0.0 if center is None else center.to(x.dtype).float())
    d = d.abs().nan_to_num(nan=math.inf).reshape(*x.shape[:-1], -1, 4)
    a, b = d.unsqueeze(-1), d.unsqueeze(-2)  # [..., 4 (j), 1], [..., 1, 4 (k)]
    idx = torch.arange(4)
    beats = (b > a) | ((b == a) & (idx.view(1, 4) < idx.view(4, 1)))
    return (beats.sum(-1) < 2).reshape(x.shape)


def _composition(x, w, b, thr, c, s, decode_rows, min_rows_24):
    rows = x.numel() // x.shape[-1]
    fill = torch.zeros((), dtype=x.dtype) if c is None else c.to(x.dtype)
    if rows <= decode_rows:
        score = (x.float() - (0.0 if c is None else c.float())).abs()
        if s is not None:
            score = score * s
        return F.linear(torch.where(~(score < thr), x, fill), w, b)
    if rows >= min_rows_24:
        return F.linear(torch.where(_keep24_by_comparison(x, c), x, fill), w, b)
    return F.linear(x, w, b)


@FAST
@given(
    rows=st.integers(0, 12), lead=st.sampled_from([(), (1,), (2,)]), groups=st.integers(1, 6),
    n=st.integers(1, 9), decode_rows=st.integers(0, 6), gap=st.integers(0, 5),
    center=st.sampled_from([None, "scalar", "vector"]), bias=st.booleans(), scale=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), seed=st.integers(0, 2**16),
)
def test_reference_matches_a_plain_composition(rows, lead, groups, n, decode_rows, gap, center, bias,
                                               scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = 4 * groups
    lead_rows = math.prod(lead) if lead else 1
    shape = (*lead, max(rows // lead_rows, 0), k) if lead else (rows, k)
    x = torch.randn(shape, generator=g).to(dtype)
    if x.numel():
        x.view(-1)[0] = x.view(-1)[1 % x.numel()]  # a tie
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    c = {None: None, "scalar": torch.tensor(0.2), "vector": 0.3 * torch.randn(k, generator=g)}[center]
    s = torch.rand(k, generator=g) + 0.5 if scale else None
    min_rows_24 = decode_rows + gap
    got = prefill_linear(x, w, b, 0.6, c, s, None, decode_rows, min_rows_24)
    want = _composition(x, w, b, 0.6, c, s, decode_rows, min_rows_24)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("rows, decode_rows, min_rows_24", [(3, 4, 8), (12, 4, 8), (12, 4, NEVER)])
def test_opcheck_prefill_linear(rows, decode_rows, min_rows_24):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    c = 0.1 * torch.randn(16, generator=g)
    s = torch.rand(16, generator=g) + 0.5
    cb = F.linear(c, w.detach())
    opcheck(torch.ops.fxsparse.prefill_linear.default,
            (x, w, b, 0.5, c, s, cb, decode_rows, min_rows_24))
    opcheck(torch.ops.fxsparse.prefill_linear.default,
            (x.detach().view(1, rows, 16), w.detach(), None, 0.5, None, None, None, decode_rows, min_rows_24))


def test_gradient_uses_the_mask_of_the_branch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 8, generator=g, requires_grad=True)
    w = torch.randn(3, 8, generator=g)
    prefill_linear(x, w, None, 0.5, None, None, None, 4, 8).sum().backward()
    keep = P.keep24_reference(x.detach())
    torch.testing.assert_close(x.grad, torch.where(keep, w.sum(0).expand(12, 8), 0.0))


# -- compiled model vs the eager hooks ---------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_plan():
    torch.compiler.reset()
    model = tiny_llama()
    plan = fxsparse.calibrate(model, token_batches(3), MLP, IgnoredScope(names=["lm_head"]),
                              progress=False, prefill="2:4")
    return model, plan


def test_calibrate_prefill_per_scope():
    model = tiny_llama()
    plan = fxsparse.calibrate(model, token_batches(1), MLP, IgnoredScope(names=["lm_head"]), progress=False,
                              prefill={TargetScope(patterns=[r".*down_proj"]): "2:4"}, decode_rows=4)
    kinds = {name: (lp.prefill, lp.decode_rows) for name, lp in plan.layers.items()}
    assert all(v == ("2:4", 4) for n, v in kinds.items() if n.endswith("down_proj"))
    assert all(v == ("threshold", 16) for n, v in kinds.items() if not n.endswith("down_proj"))
    with pytest.raises(ValueError, match="matches no calibrated layer"):
        fxsparse.calibrate(model, token_batches(1), MLP, IgnoredScope(names=["lm_head"]), progress=False,
                           prefill={TargetScope(names=["lm_head"]): "dense"})


def _logits(fn, x):
    with torch.no_grad():
        return fn(x, use_cache=False).logits


@pytest.mark.parametrize("kind", ["2:4", "dense"])
def test_compiled_matches_hooks_for_decode_and_prefill(model_and_plan, kind):
    model, plan = model_and_plan
    plan = SparsityPlan.from_dict(plan.to_dict()).set_prefill(kind)
    record = []
    opts = {"plan": plan, "record": record, "crossover_rows": 24}
    if kind == "dense":
        opts["inductor"] = False  # the 2:4 case covers Inductor; keep the file fast
    fast = torch.compile(model, backend="sparse_act", options=opts, dynamic=True)
    prefill = token_batches(1, batch=2, seq=20, seed=5)[0]  # 40 rows: > decode_rows, >= 24
    decode = token_batches(1, batch=1, seq=1, seed=6)[0]  # 1 row
    for x in (prefill, decode):
        with plan_hooks(model, plan, crossover_rows=24):
            want = _logits(model, x)
        torch.testing.assert_close(_logits(fast, x), want, rtol=1e-5, atol=1e-5)
    threshold_everywhere = SparsityPlan.from_dict(plan.to_dict()).set_prefill("threshold")
    with plan_hooks(model, threshold_everywhere):
        assert (_logits(fast, prefill) - _logits(model, prefill)).abs().max() > 1e-4
    lowered = record[0]["stages"]["lower"]
    assert lowered.count("torch.ops.fxsparse.prefill_linear.default") == 6
    assert "threshold_linear" not in lowered
    expected_min = 24 if kind == "2:4" else NEVER
    assert {d["min_rows_24"] for d in record[0]["decisions"] if d["reason"] == "planned"} == {expected_min}
    # the decode graph (1 row, a static size) gets the threshold op directly
    assert any("fxsparse.threshold_linear.default" in g["stages"]["lower"] for g in record[1:])


def test_static_row_counts_emit_the_branch_directly():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    base = dict(threshold=0.3, in_features=16, out_features=16, center=0.05)
    plan = SparsityPlan(layers={"0": LayerPlan(**base, prefill="2:4", decode_rows=2),
                                "2": LayerPlan(**{**base, "out_features": 8}, prefill="dense",
                                               decode_rows=2)})
    for rows, ops in [(1, {"fxsparse.threshold_linear"}),
                      (2, {"mask+linear"}),  # the threshold branch, above the fused kernel's rows
                      (6, {"fxsparse.prefill_linear", "linear"})]:
        torch.compiler.reset()
        record = []
        fast = torch.compile(m, backend="sparse_act", dynamic=False,
                             options={"plan": plan, "record": record, "crossover_rows": 4})
        x = torch.randn(rows, 16)
        with torch.no_grad(), plan_hooks(m, plan, crossover_rows=4):
            want = m(x)
        torch.testing.assert_close(fast(x), want)
        assert {d["op"] for d in record[0]["decisions"]} == ops
        if rows == 6:
            assert {d["branch"] for d in record[0]["decisions"]} == {"2:4", "dense"}


def test_symbolic_range_decides_at_compile_time():
    from fxsparse.dispatch import static_branch as _static_branch

    assert _static_branch((1, 16), 16, 100) == "threshold"
    assert _static_branch((17, 99), 16, 100) == "dense"
    assert _static_branch((100, math.inf), 16, 100) == "2:4"
    assert _static_branch((17, math.inf), 16, NEVER) == "dense"
    assert _static_branch((2, math.inf), 16, 100) is None
    assert _static_branch((17, 200), 16, 100) is None
    assert _static_branch(None, 16, 100) is None


def test_backend_option_is_validated():
    m = nn.Linear(8, 4)
    with pytest.raises(Exception, match="crossover_rows.*integer >= 0"):
        torch.compile(m, backend="sparse_act", options={"crossover_rows": -3})(torch.randn(2, 8))


def test_explain_shows_row_ranges():
    from fxsparse.inspection import _prefill_ranges

    d = {"decode_rows": 16, "min_rows_24": 2048, "branch": "per-call"}
    assert _prefill_ranges(d, torch.device("cuda")) == "1-16 gemv/threshold, 17-2047 dense, >=2048 2:4"
    assert _prefill_ranges({**d, "min_rows_24": NEVER}, torch.device("cpu")) == "1-16 threshold, >=17 dense"
    assert _prefill_ranges({**d, "min_rows_24": 4}, torch.device("cuda")) == "1-16 gemv/threshold, >=17 2:4"


# -- crossover ---------------------------------------------------------------------------------


def test_crossover_from_times():
    t = {256: (10, 11), 512: (10, 9.7), 1024: (10, 9.7), 2048: (10, 9.9), 4096: (10, 9.0)}
    assert X.crossover_from_times(t) == 4096  # 2048 wins by 1% only: not enough
    t[2048] = (10, 9.8)
    assert X.crossover_from_times(t) == 512
    assert X.crossover_from_times({256: (1, 0.5), 512: (1, 1.5)}) == NEVER
    assert X.crossover_from_times({256: (1, float("nan"))}) == NEVER
    assert X.crossover_from_times({}) == NEVER


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Pretend a GPU: a fixed environment and a fake measurement that counts its calls."""
    calls = []

    def measure(n, k, dtype, device, epilogue, graphs=False, rows=X.MEASURE_ROWS):
        calls.append((n, k, dtype, epilogue, graphs))
        return {m: (100.0, 90.0 if m >= 2048 else 120.0) for m in rows}

    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(X, "_unsupported", lambda *a: None)
    monkeypatch.setattr(X, "environment", lambda device: {"gpu": "FakeGPU", "torch": "x", "impl": "y"})
    monkeypatch.setattr(X, "_measure", measure)
    monkeypatch.setattr(X, "_memo", {})
    return calls


def test_crossover_is_measured_once_and_cached_on_disk(fake_gpu, monkeypatch, tmp_path):
    assert X.crossover_rows(4096, 1024, torch.bfloat16, "cpu") == 2048
    assert X.crossover_rows(4096, 1024, torch.bfloat16, "cpu") == 2048
    assert len(fake_gpu) == 1
    data = json.loads((tmp_path / "crossover.json").read_text())
    (key, entry), = data["entries"].items()
    assert "gpu=FakeGPU" in key and "n=4096" in key and "dtype=bfloat16" in key
    assert entry["rows"] == 2048 and entry["times_us"]["256"] == [100.0, 120.0]
    monkeypatch.setattr(X, "_memo", {})  # a new process: read from the file, no measurement
    assert X.crossover_rows(4096, 1024, torch.bfloat16, "cpu") == 2048 and len(fake_gpu) == 1
    assert X.crossover_rows(4096, 1024, torch.float16, "cpu") == 2048 and len(fake_gpu) == 2
    assert X.crossover_rows(4096, 1024, torch.float16, "cpu", epilogue=True) == 2048
    assert len(fake_gpu) == 3 and len(json.loads((tmp_path / "crossover.json").read_text())["entries"]) == 3
    # under CUDA graphs only GPU time counts: a measurement (and cache entry) of its own
    assert X.crossover_rows(4096, 1024, torch.float16, "cpu", graphs=True) == 2048
    assert fake_gpu[-1][-1] is True and len(fake_gpu) == 4
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("content", ["{not json", '{"format": "other"}', '{"format": "fxsparse.crossover",'
                                     ' "version": 1, "entries": []}', "[1, 2]"])
def test_corrupt_cache_is_measured_again(fake_gpu, tmp_path, caplog, content):
    (tmp_path / "crossover.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="fxsparse"):
        assert X.crossover_rows(512, 512, torch.bfloat16, "cpu") == 2048
    assert len(fake_gpu) == 1 and "unreadable crossover cache" in caplog.text
    data = json.loads((tmp_path / "crossover.json").read_text())
    assert data["format"] == "fxsparse.crossover" and len(data["entries"]) == 1


def test_gemv_pays_is_measured_once_with_a_margin(monkeypatch, tmp_path):
    calls = []

    def measure(n, k, dtype, device, sparsity):
        calls.append((n, k, sparsity))
        return (10.0, 9.0) if n > 100 else (10.0, 9.9)  # the small one wins by 1% only

    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(X, "environment", lambda device: {"gpu": "FakeGPU", "torch": "x"})
    monkeypatch.setattr(X, "_measure_gemv", measure)
    monkeypatch.setattr(X, "_memo", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert X.gemv_pays(4096, 4096, torch.bfloat16, "cuda:0", 0.5) == (True, (10.0, 9.0))
    assert X.gemv_pays(64, 4096, torch.bfloat16, "cuda:0", 0.5) == (False, (10.0, 9.9))
    assert X.gemv_pays(4096, 4096, torch.bfloat16, "cuda:0", 0.5)[0] and len(calls) == 2
    monkeypatch.setattr(X, "_memo", {})  # a new process: from the file, nothing measured
    assert X.gemv_pays(64, 4096, torch.bfloat16, "cuda:0", 0.5)[0] is False and len(calls) == 2
    assert X.gemv_pays(64, 4096, torch.bfloat16, "cuda:0", 0.4)[0] is False and len(calls) == 3
    entries = json.loads((tmp_path / "crossover.json").read_text())["entries"]
    assert sorted(e["times_us"][1] for e in entries.values()) == [9.0, 9.9, 9.9]
    # nothing measured off CUDA, without a target sparsity, or for a dtype the kernel lacks
    assert X.gemv_pays(64, 4096, torch.bfloat16, "cpu", 0.5) == (True, None)
    assert X.gemv_pays(64, 4096, torch.bfloat16, "cuda:0", None) == (True, None)
    assert X.gemv_pays(64, 4096, torch.int8, "cuda:0", 0.5) == (True, None)
    assert len(calls) == 3

    def failing(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(X, "_measure_gemv", failing)  # a failed timing keeps the kernel, uncached
    assert X.gemv_pays(8192, 8192, torch.bfloat16, "cuda:0", 0.5) == (True, None)
    assert len(json.loads((tmp_path / "crossover.json").read_text())["entries"]) == 3


def test_never_is_stored_as_null(fake_gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(X, "_measure", lambda *a, **k: {256: (1.0, 2.0)})
    assert X.crossover_rows(64, 64, torch.bfloat16, "cpu") == NEVER
    entry, = json.loads((tmp_path / "crossover.json").read_text())["entries"].values()
    assert entry["rows"] is None
    monkeypatch.setattr(X, "_memo", {})
    assert X.crossover_rows(64, 64, torch.bfloat16, "cpu") == NEVER


def test_cpu_is_never_measured(monkeypatch, tmp_path):
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(X, "_measure", lambda *a, **k: pytest.fail("measured on CPU"))
    assert X.crossover_rows(4096, 4096, torch.bfloat16, "cpu") == NEVER
    assert X.resolve_min_rows_24(4096, 4096, torch.bfloat16, "cpu") == NEVER
    assert X.resolve_min_rows_24(4096, 4096, torch.bfloat16, "cpu", override=7) == 7
    assert not (tmp_path / "crossover.json").exists()


# -- GPU: the sparse tensor-core path -----------------------------------------------------------


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [64, 200, 1024])
@pytest.mark.parametrize("center", [None, "scalar", "vector"])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse24_linear_matches_prune_then_dense(dtype, m, center, bias):
    from fxsparse.kernels import sparse24

    n, k = 512, 1024
    if sparse24.unsupported_reason(n, k, dtype, "cuda"):
        pytest.skip(sparse24.unsupported_reason(n, k, dtype, "cuda"))
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    c = {None: None, "scalar": torch.tensor(0.2, device="cuda"),
         "vector": 0.3 * torch.randn(k, device="cuda", generator=g)}[center]
    want = F.linear(P.prune24_reference(x, c).double(), w.double(), None if b is None else b.double())
    got = sparse24.sparse24_linear(x, w, b, c, None)
    assert got.shape == (m, n) and got.dtype == dtype
    assert _rel(got, want) < 1e-2
    cb = None if c is None else F.linear(c.to(dtype).expand(k), w).float()
    assert _rel(sparse24.sparse24_linear(x, w.t().contiguous().t(), b, c, cb), want) < 1e-2  # column-major W
    for rows, decode, m24 in [(m, 16, 1), (m, 16, NEVER), (m, m, 1)]:  # every branch of the op
        out = prefill_linear(x, w, b, 0.5, c, None, cb, decode, m24)
        # the CPU reference on the same inputs: the 2:4 ranking rounds the center to x's dtype, so a
        # float64 reference would rank near-ties differently
        ref = prefill_linear(x.cpu(), w.cpu(), None if b is None else b.cpu(),
                             0.5, None if c is None else c.cpu(), None, None, decode, m24)
        assert _rel(out.cpu(), ref) < 1e-2, (rows, decode, m24)


@pytest.mark.gpu
def test_crossover_rows_on_the_gpu_returns_an_int_and_caches(monkeypatch, tmp_path):
    from fxsparse.kernels import sparse24

    if not sparse24.available("cuda"):
        pytest.skip("no cuSPARSELt here")
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(X, "_memo", {})
    rows = X.crossover_rows(1024, 1024, torch.bfloat16, "cuda")
    assert isinstance(rows, int) and rows > 0
    entry, = json.loads((tmp_path / "crossover.json").read_text())["entries"].values()
    assert set(entry["times_us"]) == {str(m) for m in X.MEASURE_ROWS}
    monkeypatch.setattr(X, "_memo", {})
    monkeypatch.setattr(X, "_measure", lambda *a, **k: pytest.fail("measured twice"))
    assert X.crossover_rows(1024, 1024, torch.bfloat16, "cuda") == rows
