"""The whole path on a GPU: prepared weights, the Triton kernel under Inductor and CUDA graphs."""

import pytest
import torch

import fxsparse
from fxsparse import IgnoredScope, TargetScope
from fxsparse.reference import plan_hooks

from conftest import tiny_llama, token_batches

pytestmark = pytest.mark.gpu


def small_model_and_plan():
    """A tiny Llama on the GPU with every projection calibrated to 50%."""
    model = tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2).cuda()
    plan = fxsparse.calibrate(model, [b.cuda() for b in token_batches(4, seq=32, vocab=96)],
                              {TargetScope(patterns=[r".*_proj"]): 0.5},
                              IgnoredScope(names=["lm_head"]), progress=False)
    return model, plan


@pytest.mark.parametrize("mode", ["reduce-overhead", None])  # graphs first: lazy state bugs
def test_decode_step_on_gpu_matches_eager_hooks(mode):
    from fxsparse.kernels import sparse_gemv

    model, plan = small_model_and_plan()
    calls = []
    real = sparse_gemv.threshold_gemv_group  # every launch of the kernel goes through it

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    sparse_gemv.threshold_gemv_group = counting
    try:
        # layers this small lose to cuBLAS and would run dense (test below): force the kernel
        fast = fxsparse.compile(model, plan, mode=mode, dense_when_faster=False)
        w = model.model.layers[0].mlp.down_proj.weight
        assert w.stride() == (1, w.shape[0])  # prepared in place for the kernel
        x = token_batches(1, batch=1, seq=1, seed=3)[0].cuda()  # one decode row
        with torch.no_grad():
            for _ in range(3):  # warm-up and graph replays
                got = fast(x, use_cache=False).logits
            with plan_hooks(model, plan):
                want = model(x, use_cache=False).logits
    finally:
        sparse_gemv.threshold_gemv_group = real
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert calls, "the Triton sparse GEMV never ran"


@pytest.mark.parametrize("accumulate", [False, True])
def test_center_bias_follows_in_place_weight_update(accumulate):
    """The lowering folds ``W @ center`` into a constant; an in-place weight update after
    compiling (no recompile: Dynamo guards on metadata) must not leave it stale."""
    from fxsparse import LayerPlan, SparsityPlan
    from fxsparse.kernels.threshold_linear import threshold_linear_reference

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False)).cuda().to(torch.bfloat16).eval()
    plan = SparsityPlan(layers={"0": LayerPlan(threshold=0.5, in_features=64, out_features=48,
                                               target_sparsity=0.5, center=0.3)},
                        model=SparsityPlan.fingerprint(model))
    fast = fxsparse.compile(model, plan, dense_when_faster=False, accumulate=accumulate)
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    c = torch.tensor(0.3, device="cuda")
    with torch.no_grad():
        for _ in range(2):
            want = threshold_linear_reference(x.float(), model[0].weight.float(), None, 0.5, c)
            torch.testing.assert_close(fast(x).float(), want, rtol=2e-2, atol=2e-2)
            model[0].weight.mul_(2)


def test_small_layers_run_dense_when_the_kernel_loses(monkeypatch, tmp_path):
    """hidden 256: every projection's sparse GEMV (fixed cost ~6 µs) loses to cuBLAS (~3 µs), so
    by default each runs dense, keeps its row-major weight and records the measured times."""
    from fxsparse.kernels import crossover

    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(crossover, "_memo", {})
    model, plan = small_model_and_plan()
    record = []
    fast = fxsparse.compile(model, plan, mode="reduce-overhead", record=record)
    x = token_batches(1, batch=1, seq=1, seed=3)[0].cuda()
    with torch.no_grad():
        for _ in range(3):
            got = fast(x, use_cache=False).logits
    decisions = [d for g in record for d in g["decisions"] if d.get("plan_key")]
    assert len(decisions) == len(plan.layers)
    assert all(d["op"] == "linear" and d["reason"].startswith("sparse GEMV slower than dense")
               for d in decisions), decisions
    w = model.model.layers[0].mlp.down_proj.weight
    assert w.stride() == (w.shape[1], 1)  # left row-major
    with torch.no_grad():
        torch.testing.assert_close(got, model(x, use_cache=False).logits, rtol=1e-4, atol=1e-4)
