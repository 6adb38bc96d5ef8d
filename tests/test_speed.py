"""fxsparse.speed on CPU: the lean loop's tokens, sparsity and weight-byte accounting, HF
generate timing, the profiler breakdown, and kernel-name families."""

import json
import multiprocessing as mp
import os
import stat
from pathlib import Path

import pytest
import torch

import fxsparse
from fxsparse import IgnoredScope, TargetScope, speed
from fxsparse.reference import plan_hooks

from conftest import tiny_llama, token_batches


@pytest.fixture(scope="module")
def model_plan():
    torch.compiler.reset()
    model = tiny_llama()
    plan = fxsparse.calibrate(model, token_batches(4, seq=32), {TargetScope(patterns=[r".*_proj"]): 0.5},
                              IgnoredScope(names=["lm_head"]), progress=False)
    return model, plan


@pytest.mark.parametrize("name, family", [
    ("_threshold_gemv_kernel", "sparse_gemv"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4>(...)", "gemm"),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1", "gemm"),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>(...)", "gemm"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)",
     "attention"),
    ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64>>(...)", "attention"),
    ("triton_poi_fused__scaled_dot_product_efficient_attention_add_1", "other"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(...)", "other"),
    ("Memcpy DtoD (Device -> Device)", "memcpy"),
    ("Memset (Device)", "memcpy"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective"),
])
def test_kernel_family(name, family):
    assert speed.kernel_family(name) == family


def test_summarize_trace_per_step():
    ev = [
        {"ph": "X", "cat": "kernel", "name": "_threshold_gemv_kernel", "ts": 0, "dur": 30.0},
        {"ph": "X", "cat": "kernel", "name": "nvjet_tst_64x8", "ts": 40, "dur": 10.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 60, "dur": 2.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0, "dur": 5.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add_", "ts": 0, "dur": 4.0},
        {"ph": "i", "cat": "kernel", "name": "ignored instant", "ts": 0},
    ]
    s = speed.summarize_trace(ev, steps=2)
    assert s["kernel_us"]["sparse_gemv"] == 15.0 and s["kernel_us"]["gemm"] == 5.0
    assert s["kernel_us"]["memcpy"] == 1.0 and s["busy_us"] == 21.0 and s["kernels"] == 1.5
    assert s["runtime"] == {"cudaGraphLaunch": 0.5} and s["host_top"] == [("aten::add_", 2.0)]
    row = speed.breakdown_row(0.05, s)
    assert row["busy_ms"] == pytest.approx(0.021) and row["gap_ms"] == pytest.approx(0.029)


def test_lean_decode_matches_generate(model_plan):
    model, _ = model_plan
    prompt = token_batches(1, batch=2, seq=10, seed=3)[0]
    step = speed.compile_step(model, backend="eager")
    cache = speed.make_cache(model, 32)
    first = speed.lean_decode(model, step, prompt, 6, cache=cache)
    again = speed.lean_decode(model, step, prompt, 6, cache=cache)  # the cache is reset, not reused
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=7, do_sample=False, pad_token_id=0,
                              cache_implementation="static")
    assert torch.equal(first.tokens, want[:, 10:]) and torch.equal(again.tokens, first.tokens)
    assert len(first.step_ms) == 6 and len(first.host_ms) == 6 and first.median_ms() > 0
    assert set(first.summary()) == {"ms_per_step", "ms_per_step_mean", "host_ms_per_step"}


def test_sparse_step_is_lowered_and_matches_hooks(model_plan):
    model, plan = model_plan
    counters = torch._dynamo.utils.counters
    counters.clear()
    prompt = token_batches(1, batch=1, seq=10, seed=4)[0]
    step = speed.compile_step(model, plan, inductor=False)  # names layers like named_modules
    got = speed.lean_decode(model, step, prompt, 5).tokens
    assert counters["fxsparse"]["lowered"] == len(plan.layers)
    eager = speed.compile_step(model, backend="eager")

    def hooked(*args):  # the prefill stays dense in both runs
        with plan_hooks(model, plan):
            return eager(*args)

    want = speed.lean_decode(model, hooked, prompt, 5).tokens
    assert torch.equal(got, want)


def test_decode_sparsity_and_weight_bytes(model_plan):
    model, plan = model_plan
    one = speed.decode_sparsity(model, plan, token_batches(1, batch=1, seq=12, seed=5)[0], steps=4)
    four = speed.decode_sparsity(model, plan, token_batches(1, batch=4, seq=12, seed=5)[0], steps=4)
    assert set(one) == set(plan.layers) == set(four)
    for n in plan.layers:
        assert one[n]["union"] == pytest.approx(one[n]["sparsity"])
        assert 0.15 < four[n]["sparsity"] < 0.85  # near the 50% target on random tokens
        assert four[n]["union"] <= four[n]["sparsity"] + 1e-6  # all four rows must drop a channel
    wb = speed.linear_weight_bytes(model)
    assert len(wb) == 15 and wb["lm_head"] == 96 * 48 * 4
    dense = speed.weight_bytes_per_step(model)
    assert dense == sum(wb.values())
    half = speed.weight_bytes_per_step(model, {"model.layers.0.mlp.up_proj": 0.5})
    assert dense - half == wb["model.layers.0.mlp.up_proj"] // 2


def test_hf_decode_counts_steps_and_recompiles(model_plan):
    model, plan = model_plan
    prompt = token_batches(1, batch=1, seq=8, seed=6)[0]
    cfg = fxsparse.compile_config(plan, mode=None, compile_on_cpu=True, inductor=False)
    res = speed.hf_decode(model, prompt, 6, cfg, repeats=1, profile_steps=2)
    assert res["tokens"].shape == (1, 6)  # exactly new_tokens, whatever EOS says
    # the steps timed themselves: positive under any load (a difference of medians need not be)
    assert 0 < res["ms_per_step"] <= res["max_step_ms"] and res["prefill_ms"] > 0
    assert res["sparse_lowered"] > 0 and res["graphs"] >= 1 and res["recompiles"] == 0
    assert res["profile"]["kernel_us"]["sparse_gemv"] > 0  # the op's CPU time, by family


def test_profile_lean_and_compare_decode(model_plan):
    model, plan = model_plan
    prompt = token_batches(1, batch=1, seq=8, seed=7)[0]
    step = speed.compile_step(model, plan, inductor=False)
    prof = speed.profile_lean(model, step, prompt, steps=3)
    assert set(prof["kernel_us"]) == set(speed.FAMILIES) and prof["kernel_us"]["sparse_gemv"] > 0
    assert prof["busy_us"] == pytest.approx(sum(prof["kernel_us"].values()))
    rows = speed.compare_decode(model, plan, prompt, 3, warmup=1)
    assert [r["variant"] for r in rows] == ["dense (Inductor)", "sparse_act"]
    assert rows[0]["vs_dense"] == 1.0 and rows[1]["vs_dense"] > 0 and rows[1]["tokens"].shape == (1, 4)


def test_bench_decode_variants_and_report(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    assert decode.matches("llama3-8b", "lean", 4, 0.0, ["*:4:0.0"])
    assert decode.matches("smollm2-135m", "hf", 1, "dense", ["smollm2-135m:hf:*"])
    assert not decode.matches("llama3-8b", "lean", 1, 0.5, ["lean:4:*", "smollm2-135m:*"])
    row = dict(preset="tiny", layers=2, loop="lean", batch=1, ms_per_step=2.0, tokens_per_s=500.0,
               weight_TBps=0.1, achieved_sparsity=None, graphs=1, recompiles=0)
    rows = [{**row, "sparsity": "dense"},
            {**row, "sparsity": 0.5, "ms_per_step": 1.0, "achieved_sparsity": 0.5},
            {**row, "sparsity": 0.4, "error": "RuntimeError: boom"}]
    for i, r in enumerate(rows):
        decode.write(str(tmp_path / f"part{i}"), [r], ["info"])
    decode.report([str(tmp_path / f"part{i}.json") for i in range(3)], str(tmp_path / "all"))
    text = (tmp_path / "all.md").read_text()
    assert "| tiny (2 L) | lean | 1 | sparse_act 0.5 | 0.500 | 1.000 | 500.0 | 2.00x |" in text
    assert "error: RuntimeError: boom" in text and text.count("\n| tiny") == 3


# -- the crossover cache file (kernels/crossover.py) ----------------------------------------------


def _write_cache_entries(args: tuple[str, int, int]) -> None:
    from fxsparse.kernels.crossover import _write_entry

    path, worker, n = args
    for j in range(n):
        _write_entry(Path(path), f"k{worker}-{j}", {"rows": 256})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (POSIX)")
def test_crossover_cache_keeps_concurrent_writers_entries(tmp_path):
    """4 processes x 20 read-modify-writes: without the lock, last rename wins and drops some."""
    path = tmp_path / "crossover.json"
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_write_cache_entries, [(str(path), i, 20) for i in range(4)])
    entries = json.loads(path.read_text())["entries"]
    assert sorted(entries) == sorted(f"k{i}-{j}" for i in range(4) for j in range(20))
    assert not list(tmp_path.glob(".*tmp")), "temp file left behind"


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_crossover_cache_file_gets_the_usual_mode(tmp_path, umask):
    from fxsparse.kernels.crossover import _read_cache, _write_entry

    path = tmp_path / "cache" / "crossover.json"
    old = os.umask(umask)
    try:
        _write_entry(path, "k", {"rows": 512})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert _read_cache(path) == {"k": {"rows": 512}}
