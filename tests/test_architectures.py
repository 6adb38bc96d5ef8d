"""One tiny random model per architecture family: compiled sparse_act equals the eager hooks."""

import re

import pytest
import torch
import transformers as tf

import fxsparse
from fxsparse import IgnoredScope, TargetScope
from fxsparse.plan import linear_layers
from fxsparse.reference import plan_hooks

V = 80
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, COMMON),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, COMMON),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, COMMON),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {**COMMON, "head_dim": 8,
                                                            "sliding_window": 16}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {**COMMON, "pad_token_id": 0}),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                    n_positions=64)),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, dict(vocab_size=V, hidden_size=32, ffn_dim=64,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  max_position_embeddings=64,
                                                  word_embed_proj_dim=32, pad_token_id=1)),
}

# what each family's linears are called: the plan uses the real module names
EXPECTED = {
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
            "fc1", "fc2"},
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_compiled_equals_eager_hooks(arch):
    cfg_cls, model_cls, kw = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw)).eval()
    names = [n for n in linear_layers(model) if n != "lm_head"]
    if arch in EXPECTED:
        assert {re.sub(r"^.*\.(layers|h)\.\d+\.", "", n) for n in names} == EXPECTED[arch]
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(2, V, (2, 16), generator=g) for _ in range(3)]
    plan = fxsparse.calibrate(model, data, {TargetScope(patterns=[r".*\.(layers|h)\..*"]): 0.4},
                              IgnoredScope(names=["lm_head"]), progress=False)
    assert set(plan.layers) == set(names)
    record = []
    # Inductor's handling of the op is tested in test_backend; here the rewrite of each family's
    # graphs is what matters, and skipping Inductor keeps seven compiles cheap on CPU.
    fast = torch.compile(model, backend="sparse_act",
                         options={"plan": plan, "record": record, "inductor": False})
    x = torch.randint(2, V, (1, 12), generator=g)
    with torch.no_grad():
        got = fast(x, use_cache=False).logits
        with plan_hooks(model, plan):
            want = model(x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    lowered = {d["name"] for g_ in record for d in g_["decisions"] if d["op"] != "linear"}
    assert lowered == set(names)
