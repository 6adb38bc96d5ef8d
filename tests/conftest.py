import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. It must be chosen
# before triton is first imported, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

# CI replays the same examples every run (a red CI must mean a regression); locally hypothesis
# keeps drawing new ones, which is how new counterexamples are found.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles models of one class; without a reset, Dynamo's per-code cache fills
    # up (recompile limit) and later tests would silently run eagerly.
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def tiny_llama(seed: int = 0, layers: int = 2, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture
def llama():
    return tiny_llama()


def token_batches(n: int, batch: int = 2, seq: int = 24, vocab: int = 96, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def calibrated_tiny_llama(batches: int = 6):
    """A tiny Llama and a plan for all seven projections (MLP 40/50%, attention 30%), lm_head
    ignored: what the backend tests compile."""
    import fxsparse
    from fxsparse import IgnoredScope, TargetScope

    torch.compiler.reset()
    model = tiny_llama()
    targets = {TargetScope(patterns=[r".*mlp\.(up|gate)_proj"]): 0.4,
               TargetScope(patterns=[r".*mlp\.down_proj"]): 0.5,
               TargetScope(patterns=[r".*self_attn\.[qkvo]_proj"]): 0.3}
    plan = fxsparse.calibrate(model, token_batches(batches), targets, IgnoredScope(names=["lm_head"]),
                              progress=False)
    return model, plan


def gpu_decode_step(**options):
    """The calibrated tiny Llama in bf16 on the GPU, weights prepared, one token compiled by
    ``sparse_act`` through Inductor (tiny layers lose to cuBLAS: ``dense_when_faster`` off keeps
    them sparse): ``(compiled logits, the eager hooks' logits, the graphs' decisions)``."""
    import fxsparse
    from fxsparse.reference import plan_hooks

    model, plan = calibrated_tiny_llama()
    model = model.cuda().to(torch.bfloat16)
    fxsparse.prepare_weights(model, plan)
    record = []
    fast = torch.compile(model, backend="sparse_act",
                         options={"plan": plan, "record": record, "dense_when_faster": False, **options})
    x = torch.randint(0, 96, (1, 1), device="cuda")
    with torch.no_grad():
        got = fast(x, use_cache=False).logits.float()
        with plan_hooks(model, plan):
            want = model(x, use_cache=False).logits.float()
    return got, want, [d for g in record for d in g["decisions"]]
