"""HF generate with a static cache, its decode step compiled by sparse_act: same tokens as the
eager hooks reference, and no recompilation per generated token."""

import torch

import fxsparse
from fxsparse import IgnoredScope, TargetScope
from fxsparse.reference import plan_hooks

from conftest import tiny_llama, token_batches


def test_generate_static_cache_matches_eager_and_does_not_recompile():
    model = tiny_llama()
    plan = fxsparse.calibrate(model, token_batches(4, seq=32),
                              {TargetScope(patterns=[r".*_proj"]): 0.4},
                              IgnoredScope(names=["lm_head"]), progress=False)
    prompt = token_batches(1, batch=1, seq=10, seed=5)[0]
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    cfg = fxsparse.compile_config(plan, mode=None, compile_on_cpu=True)
    counters = torch._dynamo.utils.counters
    counters.clear()  # they accumulate across every test of the pytest run
    other = token_batches(1, batch=1, seq=10, seed=6)[0]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=14, compile_config=cfg, **kw)
        graphs = counters["stats"]["unique_graphs"]
        model.generate(other, max_new_tokens=14, compile_config=cfg, **kw)
        with plan_hooks(model, plan):
            want = model.generate(prompt, max_new_tokens=14, **kw)
    assert counters["fxsparse"]["lowered"] > 0, "generate never compiled with sparse_act"
    # 14 tokens, at most a prefill and a decode graph; a second call compiles nothing new
    assert 1 <= graphs <= 2
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled on a second generate"
    assert torch.equal(out, want)
