"""Tensor parallelism (``fxsparse/sharding.py``): two CPU ranks over gloo, a tiny Llama sharded by
PyTorch's ``parallelize_module`` (and by transformers' ``tp_plan="auto"``), compiled with
``sparse_act`` and the unsharded model's plan, against the single-process eager reference; and
tensor-parallel calibration against single-process calibration.

The ranks are spawned once for the whole file (a module fixture): starting a process that
imports torch and transformers costs more than the checks on CI's two cores. Each check runs in
both ranks and reports its traceback, if any, to the test of its name. A hang fails: the
process group times out, and the parent kills the ranks after ``_TIMEOUT_S``.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import json
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_llama, token_batches

_TIMEOUT_S = 240
WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` on ``WORLD`` gloo ranks; a rank's exception fails the test."""
    ctx = mp.start_processes(_entry, args=(fn, _free_port(), args), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + _TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"ranks still running after {_TIMEOUT_S} s (hang?)")


def _tp_styles(model, colwise=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
               rowwise=("o_proj", "down_proj")):
    """``parallelize_module``'s plan for a Llama: column-parallel q/k/v/gate/up, row-parallel o/down."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for name, _ in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in colwise:
            plan[name] = ColwiseParallel()
        elif leaf in rowwise:
            plan[name] = RowwiseParallel()
    return plan


def _parallelize(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))
    return parallelize_module(model, mesh, _tp_styles(model)), mesh


def _per_channel_plan():
    """A one-layer tiny Llama and a plan for its seven projections at 50% with a per-channel
    center and scale (row-parallel layers must slice them), thresholds from one eager pass
    (no compile: calibration has tests of its own)."""
    from fxsparse import LayerPlan, SparsityPlan
    from fxsparse.plan import linear_layers

    model = tiny_llama(layers=1)
    inputs = {}
    modules = dict(model.named_modules())
    names = [n for n in linear_layers(model) if n != "lm_head"]
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach()))
             for n in names]
    with torch.no_grad():
        model(token_batches(1)[0], use_cache=False)
    for h in hooks:
        h.remove()
    layers = {}
    for n in names:
        out_f, in_f = linear_layers(model)[n]
        center = torch.tensor([0.02 * ((i % 7) - 3) for i in range(in_f)])
        scale = torch.tensor([1.0 + 0.1 * (i % 5) for i in range(in_f)])
        score = ((inputs[n].reshape(-1, in_f) - center).abs() * scale).flatten()
        layers[n] = LayerPlan(threshold=float(score.quantile(0.5)), in_features=in_f, out_features=out_f,
                              target_sparsity=0.5, center=center.tolist(), channel_scale=scale.tolist())
    return model, SparsityPlan(layers=layers, model=SparsityPlan.fingerprint(model),
                               skipped={"lm_head": "ignored_scope"})


def _sparse_act_aot(plan, record, graphs):
    """``sparse_act`` without Inductor, then AOTAutograd as Inductor would trace it (DTensors
    flattened, collectives functional): the graph AOTAutograd produced goes to ``graphs``. The
    code path of ``backend="sparse_act"`` up to Inductor's code generation, without its C++
    compile (minutes on CI's two cores for two ranks)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from fxsparse import sparse_act

    def forward(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        gm = sparse_act(gm, example_inputs, options={"plan": plan, "record": record, "inductor": False,
                                                     "dense_when_faster": False})
        return aot_autograd(fw_compiler=forward)(gm, example_inputs)

    return backend


def _reference_logits(model, plan, x):
    from fxsparse.reference import plan_hooks

    with torch.no_grad(), plan_hooks(model, plan):
        return model(x, use_cache=False).logits


# -- compile: parallelize_module ------------------------------------------------------------------


def _compile_checks(rank: int, folder: str, want: dict) -> None:
    import fxsparse
    from fxsparse import LayerPlan, PlanError, SparsityPlan

    model, plan = _per_channel_plan()
    reference = copy.deepcopy(model)
    sharded, mesh = _parallelize(model)
    x = torch.randint(0, 96, (1, 1), generator=torch.Generator().manual_seed(3))
    want = _reference_logits(reference, plan, x)
    assert (want - _reference_logits(reference, SparsityPlan(layers={}), x)).abs().max() > 1e-3

    # the unsharded plan on the sharded model, through AOTAutograd: the single-process result
    torch.compiler.reset()
    record, graphs = [], []
    fast = torch.compile(sharded, backend=_sparse_act_aot(plan, record, graphs))
    with torch.no_grad():
        got = fast(x, use_cache=False).logits
    assert not isinstance(got, torch.distributed.tensor.DTensor)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    decisions = {d["name"]: d for g in record for d in g["decisions"]}
    down, k = decisions["model.layers.0.mlp.down_proj"], decisions["model.layers.0.self_attn.k_proj"]
    assert (down["tp"], down["op"]) == (f"rowwise [{rank * 48}, {rank * 48 + 48}) of 2",
                                        "fxsparse.threshold_linear_act")  # silu(gate) * up fused
    assert (k["tp"], k["op"]) == (f"colwise [{rank * 12}, {rank * 12 + 12}) of 2",
                                  "fxsparse.threshold_linear_group")  # q/k/v: one mask, one call
    (code,) = graphs  # the engine's all-reduces (o_proj, down_proj) stay; no DTensor op is left
    assert code.count("_c10d_functional.all_reduce") == 2 and "fxsparse.threshold_linear_act" in code

    # a layer sharded as fxsparse does not slice (a row-parallel weight fed a replicated input)
    # runs dense, left to DTensor, with its reason
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

    torch.manual_seed(0)
    odd = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False))
    odd_plan = SparsityPlan(layers={"0": LayerPlan(threshold=0.5, in_features=16, out_features=8)},
                            model=SparsityPlan.fingerprint(odd))
    xs = torch.randn(1, 16)
    dense_out = odd(xs)

    def shard_columns(name, module, mesh):
        if name == "0":
            module.weight = torch.nn.Parameter(distribute_tensor(module.weight, mesh, [Shard(1)]))

    def replicated_input(module, inputs, mesh):
        return (DTensor.from_local(inputs[0], mesh, [Replicate()]),)

    distribute_module(odd, mesh, shard_columns, input_fn=replicated_input,
                      output_fn=lambda mod, out, mesh: out.redistribute(mesh, [Replicate()]).to_local())
    torch.compiler.reset()
    record = []
    got = torch.compile(odd, backend="sparse_act",
                        options={"plan": odd_plan, "record": record, "inductor": False})(xs)
    (d,) = [d for g in record for d in g["decisions"]]
    assert d["op"] == "linear" and d["reason"].startswith("tensor parallel: input placement (Replicate(),)")
    torch.testing.assert_close(got, dense_out)
    torch.compiler.reset()
    (row,) = fxsparse.explain(odd, xs, plan=odd_plan).rows
    assert row.runs_dense and row.reason == d["reason"]

    # explain on the sharded model: each layer's measured sparsity is the unsharded model's
    # (row-parallel probes add up their ranks' dropped counts per token)
    torch.compiler.reset()
    rows = {r.name: r for r in fxsparse.explain(sharded, x, plan=plan).rows}
    torch.compiler.reset()
    for r in fxsparse.explain(reference, x, plan=plan).rows:
        if r.sparsity is not None:
            assert rows[r.name].sparsity == pytest.approx(r.sparsity, abs=1e-6), r.name
            assert rows[r.name].token_std == pytest.approx(r.token_std, abs=1e-6), r.name
            assert rows[r.name].op == r.op, r.name

    # a plan for another model: refused, naming a layer
    torch.compiler.reset()
    with pytest.raises(PlanError, match="model.layers.0"):
        fxsparse.compile(_parallelize(tiny_llama(layers=1, intermediate_size=64))[0], plan)


def test_parallelize_module_compiles_to_the_single_process_result(ranks):
    ranks("compile")


def test_row_parallel_slices_and_their_errors():
    """The rank's part of a plan entry: column-parallel rows, row-parallel channel slices of
    center and scale; a per-channel vector the world size does not divide, or a top-k entry
    split by rows, is refused with the layer's name."""
    from fxsparse import LayerPlan, PlanError
    from fxsparse.sharding import Layout, local_plan, unsliceable_reason

    lp = LayerPlan(threshold=0.5, in_features=6, out_features=4, center=[0.0, 1, 2, 3, 4, 5],
                   channel_scale=[1.0, 2, 3, 4, 5, 6])
    row = local_plan("a.down", lp, Layout("rowwise", 3, 6, rank=1, world=2))
    assert (row.in_features, row.out_features, row.center, row.channel_scale) == (3, 4, [3, 4, 5], [4, 5, 6])
    col = local_plan("a.up", lp, Layout("colwise", 2, 4, rank=1, world=2))
    assert (col.in_features, col.out_features, col.center) == (6, 2, lp.center)
    with pytest.raises(PlanError, match=r"'a.down'.*6 channels.*4 ranks"):
        local_plan("a.down", lp, Layout("rowwise", 2, 4, rank=1, world=4))
    scalar = LayerPlan(threshold=0.5, in_features=6, out_features=4)
    assert local_plan("a.down", scalar, Layout("rowwise", 4, 6, rank=1, world=4)).in_features == 2
    topk = LayerPlan(threshold=0.0, in_features=6, out_features=4, method="topk", target_sparsity=0.5)
    assert "top-k" in unsliceable_reason(topk, Layout("rowwise", 3, 6, rank=1, world=2))
    assert unsliceable_reason(topk, Layout("colwise", 2, 4, rank=1, world=2)) is None


# -- calibrate ----------------------------------------------------------------------------------


def _calibration_checks(rank: int, folder: str, want: dict) -> None:
    import fxsparse
    from fxsparse import ActivationObserver, IgnoredScope, SparsityPlan, TargetScope
    from fxsparse.calibration import collect_statistics

    want = SparsityPlan.from_dict(want)
    model, _ = _parallelize(tiny_llama(layers=1))
    torch.compiler.reset()
    got = fxsparse.calibrate(model, token_batches(1), {TargetScope(patterns=[r".*_proj"]): 0.5},
                             IgnoredScope(names=["lm_head"]), method="mode", center="median", progress=False)
    assert list(got.layers) == list(want.layers)
    for name, lp in want.layers.items():
        g = got.layers[name]
        assert g.threshold == pytest.approx(lp.threshold, rel=1e-5), name
        assert g.center == pytest.approx(lp.center, rel=1e-5, abs=1e-7), name
        assert g.calibrated_sparsity == pytest.approx(lp.calibrated_sparsity, abs=1e-5), name
        assert (g.in_features, g.out_features) == (lp.in_features, lp.out_features)
    # every rank holds rank 0's plan; only rank 0 writes it
    box = [None] * WORLD
    dist.all_gather_object(box, got.to_dict())
    assert box[0] == box[1]
    path = Path(folder) / "plans" / f"plan_{rank}.json"
    got.save(path)
    assert path.exists() == (rank == 0)
    with pytest.raises(ValueError, match="calibrate the unsharded model"):
        fxsparse.calibrate(model, token_batches(1), {TargetScope(patterns=[r".*_proj"]): 0.5}, refine=1)

    # per-channel statistics of row-parallel inputs: each rank's slice, concatenated in rank order
    names = {"model.layers.0.mlp.down_proj": 96, "model.layers.0.self_attn.o_proj": 48,
             "model.layers.0.mlp.up_proj": 48}
    observers = {n: ActivationObserver(n, k) for n, k in names.items()}
    torch.compiler.reset()
    collect_statistics(model, token_batches(1), observers, progress=False)
    unsharded = tiny_llama(layers=1)
    modules = dict(unsharded.named_modules())
    inputs = {}
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
             for n in names]
    with torch.no_grad():
        unsharded(token_batches(1)[0], use_cache=False)
    for h in hooks:
        h.remove()
    for n, k in names.items():
        obs, x = observers[n], inputs[n].reshape(-1, k).double()
        assert (obs.shard is None) == n.endswith("up_proj"), n  # column-parallel inputs are whole
        assert int(obs.ch_count) == x.shape[0] and obs.count == x.numel(), n
        torch.testing.assert_close(obs.ch_sum, x.sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(obs.ch_absmax, x.abs().amax(0), rtol=1e-5, atol=1e-7)


def test_tensor_parallel_calibration_gives_the_single_process_plan(ranks):
    ranks("calibration")


# -- transformers' tp_plan="auto" ---------------------------------------------------------------


def _hf_checks(rank: int, folder: str, want: dict) -> None:
    from transformers import LlamaForCausalLM

    import fxsparse

    model, plan = _per_channel_plan()
    folder = Path(folder) / "llama"
    if rank == 0:
        model.save_pretrained(folder)
    dist.barrier()
    sharded = LlamaForCausalLM.from_pretrained(folder, tp_plan="auto").eval()
    assert isinstance(sharded.model.layers[0].mlp.down_proj.weight, torch.distributed.tensor.DTensor)
    x = torch.randint(0, 96, (1, 1), generator=torch.Generator().manual_seed(5))
    expected = _reference_logits(model, plan, x)
    torch.compiler.reset()
    record, graphs = [], []
    fast = torch.compile(sharded, backend=_sparse_act_aot(plan, record, graphs))
    with torch.no_grad():
        got = fast(x, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    decisions = {d["name"]: d for g in record for d in g["decisions"]}
    o, down = decisions["model.layers.0.self_attn.o_proj"], decisions["model.layers.0.mlp.down_proj"]
    # calibration of transformers' layout (linears on local tensors): the single-process plan
    from fxsparse import IgnoredScope, SparsityPlan, TargetScope

    torch.compiler.reset()
    calibrated = fxsparse.calibrate(sharded, token_batches(1), {TargetScope(patterns=[r".*_proj"]): 0.5},
                                    IgnoredScope(names=["lm_head"]), method="mode", center="median",
                                    progress=False)
    for name, lp in SparsityPlan.from_dict(want).layers.items():
        assert calibrated.layers[name].threshold == pytest.approx(lp.threshold, rel=1e-5), name
        assert calibrated.layers[name].center == pytest.approx(lp.center, rel=1e-5, abs=1e-7), name
    assert o["tp"] == f"rowwise [{rank * 24}, {rank * 24 + 24}) of 2"
    assert o["op"] == "fxsparse.threshold_linear"
    assert down["op"] == "fxsparse.threshold_linear_act"


def test_transformers_tp_plan_auto(ranks):
    ranks("transformers")


# -- the ranks, spawned once ----------------------------------------------------------------------

_HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None  # transformers' tp_plan needs it
_CHECKS = {"compile": _compile_checks, "calibration": _calibration_checks, "transformers": _hf_checks}


def _run_checks(rank: int, folder: str, want: dict, names: list[str]) -> None:
    results = {}
    for name in names:
        try:
            _CHECKS[name](rank, folder, want)
            results[name] = None
        except BaseException:  # reported to the check's test; the next check still runs
            results[name] = traceback.format_exc()
        torch.compiler.reset()
    Path(folder, f"results_{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Spawn the ranks once, run every check, and return ``check(name)``, which fails with the
    ranks' tracebacks of that check (or skips it)."""
    import fxsparse
    from fxsparse import IgnoredScope, TargetScope

    folder = tmp_path_factory.mktemp("tp")
    targets = {TargetScope(patterns=[r".*_proj"]): 0.5}
    want = fxsparse.calibrate(tiny_llama(layers=1), token_batches(1), targets,
                              IgnoredScope(names=["lm_head"]), method="mode", center="median", progress=False)
    names = [n for n in _CHECKS if n != "transformers" or _HAS_ACCELERATE]
    _spawn(_run_checks, str(folder), want.to_dict(), names)
    results = [json.loads((folder / f"results_{r}.json").read_text()) for r in range(WORLD)]

    def check(name: str) -> None:
        if name not in names:
            pytest.skip("transformers' tp_plan needs accelerate (pip install accelerate)")
        errors = [f"rank {r}:\n{res[name]}" for r, res in enumerate(results) if res[name]]
        if errors:
            pytest.fail("\n".join(errors), pytrace=False)

    return check


# -- one GPU: the whole path on a world of one --------------------------------------------------


@pytest.mark.gpu
def test_one_gpu_world_of_one_decodes_like_the_plain_model():
    """DTensor, NCCL collectives, CUDA graphs and the kernels on one rank: bf16 logits of the
    sharded model compiled with reduce-overhead equal the eager reference's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    import fxsparse

    from conftest import calibrated_tiny_llama

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model, plan = calibrated_tiny_llama()
        model = model.cuda().to(torch.bfloat16)
        reference = copy.deepcopy(model)
        mesh = init_device_mesh("cuda", (1,))
        parallelize_module(model, mesh, _tp_styles(model))
        torch.compiler.reset()
        record = []
        fast = fxsparse.compile(model, plan, mode="reduce-overhead", record=record, dense_when_faster=False)
        x = torch.randint(0, 96, (1, 1), device="cuda")
        with torch.no_grad():
            for _ in range(3):  # warm-up, record, replay
                got = fast(x, use_cache=False).logits.float()
        want = _reference_logits(reference, plan, x).float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        ops = {d["op"] for g in record for d in g["decisions"] if d.get("tp")}
        assert "fxsparse.threshold_linear_group" in ops and "fxsparse.threshold_linear_act" in ops
    finally:
        dist.destroy_process_group()
