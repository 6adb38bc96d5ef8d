"""2:4 activation-sparse training: conversion, op gradients, feature-wise backward, schedule."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.library import opcheck

from fxsparse import training as T
from fxsparse.kernels import prune24 as P

# The core's backend passes training graphs to Inductor; until it exists, aot_eager runs the
# same AOTAutograd path (forward and backward graphs) without Inductor's codegen time.
BACKEND = "sparse_act" if importlib.util.find_spec("fxsparse.backend") else "aot_eager"
METHODS = ["naive", "mvue", "soft_threshold"]


def ffn(x, w1, w2, sparse, method, frac=0.05, permute=True, seed=0, scale=None):
    """Full op outputs ``(y, y1, y2s, counts, scale)`` of ``fxsparse::squared_relu24_ffn``."""
    s = torch.tensor(math.nan) if scale is None else torch.tensor(scale)
    return torch.ops.fxsparse.squared_relu24_ffn(
        x, w1, w2, torch.tensor(sparse), s, method, True, seed, frac, permute, 0
    )


def weights(t=32, h=16, i=48, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(i, h, generator=g, dtype=dtype) / h**0.5).requires_grad_()
    w2 = (torch.randn(h, i, generator=g, dtype=dtype) / i**0.5).requires_grad_()
    return x, w1, w2


def tiny_llama(intermediate=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


# -- conversion -----------------------------------------------------------------------------


def test_conversion_keeps_parameter_count():
    model = tiny_llama(intermediate=64)
    before = sum(p.numel() for p in model.parameters())
    T.convert_to_squared_relu_24(model, method="naive")
    after = sum(p.numel() for p in model.parameters())
    assert before == after
    mlps = [m for m in model.modules() if isinstance(m, T.SquaredReLU24MLP)]
    assert len(mlps) == 2 and all(m.intermediate_size == 96 for m in mlps)
    assert not any(hasattr(m, "gate_proj") for m in mlps)
    assert model.fxsparse_sparse24.method == "naive"
    # fresh init from the config's initializer_range
    std = mlps[0].up_proj.weight.std().item()
    assert abs(std - model.config.initializer_range) < 0.2 * model.config.initializer_range
    ids = torch.randint(0, 64, (2, 8))
    assert model(ids, labels=ids).loss.isfinite()


def test_conversion_does_not_patch_transformers():
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaMLP.forward
    T.convert_to_squared_relu_24(tiny_llama())
    assert modeling_llama.LlamaMLP.forward is forward
    assert type(tiny_llama().model.layers[0].mlp) is modeling_llama.LlamaMLP


def test_conversion_rejects_non_llama_mlp():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match=r"transformer\.h\.0\.mlp \(GPT2MLP\)"):
        T.convert_to_squared_relu_24(gpt2)
    with pytest.raises(TypeError, match="Sequential holds no Llama-family SwiGLU MLP"):
        T.convert_to_squared_relu_24(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match=r"blk \(Linear\) is not a Llama-family"):
        T.convert_mlp(nn.Linear(4, 4), name="blk")


def test_config_validation_and_json():
    cfg = T.Sparse24Config(method="naive", dense_warmup_steps=5)
    assert T.Sparse24Config.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="method"):
        T.Sparse24Config(method="top2")
    with pytest.raises(ValueError, match="dense_feature_fraction"):
        T.Sparse24Config(dense_feature_fraction=1.5)


def test_state_buffers_stay_on_cpu_and_in_state_dict():
    mlp = T.SquaredReLU24MLP(8, 16).to(torch.float64)
    assert mlp.step.device.type == "cpu" and mlp.step.dtype == torch.int64
    assert mlp.up_proj.weight.dtype == torch.float64
    assert {"step", "soft_scale"} <= set(mlp.state_dict())


# -- forward 2:4 ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_forward_is_24_and_matches_reference(method):
    x, w1, w2 = weights(dtype=torch.float32)
    y, y1, y2s, counts, scale = ffn(x, w1, w2, True, method, seed=3)
    assert P.is_24(y2s)
    v = torch.relu(x @ w1.t()).square()
    torch.testing.assert_close(y1, x @ w1.t())
    if method == "mvue":
        # same seed -> same draw; kept entries are v / p >= v, so kept mask is in v's support
        assert bool(((y2s != 0) <= (v != 0)).all())
    else:
        torch.testing.assert_close(y2s, P.sparsify24_reference(v, method))
    expected_scale = 1.0
    if method == "soft_threshold":
        expected_scale = float((v * y2s).sum() / (y2s * y2s).sum())
    assert scale.item() == pytest.approx(expected_scale, rel=1e-5)
    torch.testing.assert_close(y, expected_scale * (y2s @ w2.t()))
    assert torch.equal(counts, (y2s != 0).sum(0, dtype=torch.int32))


def test_dense_mode_is_plain_ffn():
    x, w1, w2 = weights()
    y = ffn(x, w1, w2, False, "mvue")[0]
    torch.testing.assert_close(y, torch.relu(x @ w1.t()).square() @ w2.t())


# -- gradients ------------------------------------------------------------------------------


def masked_reference(x, w1, w2, y2s, scale, method):
    """Dense autograd of the same masked computation: y = s * (D * ReLU(x W1^T)^2) W2^T.

    D (mask, times 1/p for MVUE) is a constant; the soft threshold's shift enters as a
    constant offset, so the value matches the op and the gradient flows through D only.
    """
    v = torch.relu(x @ w1.t()).square()
    keep = y2s != 0
    if method == "mvue":
        d = torch.where(keep, y2s / torch.where(keep, v, 1).detach(), 0)
    else:
        d = keep.to(v.dtype)
    lin = d * v
    return scale * ((lin + (y2s - lin).detach()) @ w2.t())


@pytest.mark.parametrize("method", METHODS)
def test_exact_gradients_of_masked_computation(method):
    """dense_feature_fraction=1: every weight gradient dense, so all three are exact."""
    x, w1, w2 = weights()
    y, _, y2s, _, scale = ffn(x, w1, w2, True, method, frac=1.0, seed=5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w1, w2), g)
    ref_y = masked_reference(x, w1, w2, y2s, scale.item(), method)
    torch.testing.assert_close(y, ref_y)
    want = torch.autograd.grad(ref_y, (x, w1, w2), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_dense_mode_gradcheck():
    x, w1, w2 = weights(t=8, h=4, i=8)
    f = lambda x, w1, w2: ffn(x, w1, w2, False, "naive")[0]
    assert torch.autograd.gradcheck(f, (x, w1, w2))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("permute", [True, False])
def test_feature_wise_backward_matches_reference(method, permute):
    """dW from 2:4 along (permuted) tokens for sparse features, dense for the densest 5%."""
    x, w1, w2 = weights(t=64, i=80)
    y, y1, y2s, counts, scale = ffn(x, w1, w2, True, method, frac=0.05, permute=permute)
    dy = torch.randn_like(y)
    dx, dw1, dw2 = torch.autograd.grad(y, (x, w1, w2), dy)
    # independent reference
    s = scale.item()
    r = torch.relu(y1)
    factor = 2 * y2s / torch.where(r > 0, r, 1) if method == "mvue" else 2 * r
    dy1 = torch.where(y2s != 0, (s * dy) @ w2.detach() * factor, 0)
    n_dense = math.ceil(0.05 * 80)
    dense = torch.zeros(80, dtype=torch.bool)
    dense[torch.topk(counts.long() * 80 + (79 - torch.arange(80)), n_dense).indices] = True
    perm = T.token_permutation(64, "cpu")[0] if permute else torch.arange(64)

    def tokenwise(a):  # [T, i] -> [i, T] top-2 of 4 permuted tokens; dense features kept whole
        pruned = P.prune24_reference(a[perm].t())
        return torch.where(dense[:, None], a[perm].t(), pruned)

    torch.testing.assert_close(dx, dy1 @ w1.detach())
    torch.testing.assert_close(dw1, tokenwise(dy1) @ x.detach()[perm])
    torch.testing.assert_close(dw2, (tokenwise(y2s) @ (s * dy)[perm]).t())
    # the approximation changes dW (some token-wise drops happen) but not dX
    assert not torch.allclose(dw1, dy1.t() @ x.detach())


def test_feature_wise_patterns_and_95_5_split():
    x, w1, w2 = weights(t=128, i=200, dtype=torch.float32)
    _, _, y2s, counts, _ = ffn(x, w1, w2, True, "naive")
    dense = T.dense_feature_mask(counts, 0.05)
    assert int(dense.sum()) == 10  # ceil(5% of 200)
    assert counts[dense].min() >= counts[~dense].max()  # the densest features stay dense
    perm = T.token_permutation(128, "cpu")[0]
    z = P.prune24_tokens_t(y2s, perm, dense)  # [i, T]
    assert z.shape == (200, 128)
    assert P.is_24(z[~dense], dim=-1)  # 2:4 along tokens for the sparse 95%
    assert not z[dense].any()  # dense 5% computed separately
    # forward mask re-applied: nothing appears in the backward where the forward dropped it
    assert bool(((z != 0).t()[perm.argsort()] <= (y2s != 0)).all())
    assert T.dense_feature_mask(counts, 0.0) is None


def test_forward_mask_reapplied_in_backward():
    x, w1, w2 = weights(dtype=torch.float32)
    y, _, y2s, _, _ = ffn(x, w1, w2, True, "naive", frac=1.0)
    y1 = (x @ w1.t()).detach().requires_grad_()
    # gradient w.r.t. the pre-activation, through the op's backward, via x's gradient
    dx = torch.autograd.grad(y, x, torch.ones_like(y))[0]
    dy1 = torch.where(y2s != 0, torch.ones_like(y) @ w2.detach() * 2 * torch.relu(y1), 0)
    torch.testing.assert_close(dx, dy1.detach() @ w1.detach())
    assert P.is_24(dy1)


def test_permutation_round_trip():
    perm, inv = T.token_permutation(37, "cpu", seed=3)
    x = torch.randn(37, 5)
    assert torch.equal(T.unpermute_tokens(T.permute_tokens(x, perm), inv), x)
    assert not torch.equal(perm, torch.arange(37))
    assert torch.equal(T.token_permutation(37, "cpu", seed=3)[0], perm)  # fixed
    assert torch.equal(torch.sort(perm).values, torch.arange(37))


# -- schedule -------------------------------------------------------------------------------


def test_warmup_switch_eager():
    torch.manual_seed(0)
    mlp = T.SquaredReLU24MLP(16, 32, T.Sparse24Config(method="naive", dense_warmup_steps=2))
    x = torch.randn(2, 8, 16)
    dense = lambda: torch.relu(x @ mlp.up_proj.weight.t()).square() @ mlp.down_proj.weight.t()
    for step in range(4):
        assert mlp.sparse_active == (step >= 2)
        y = mlp(x)
        y.sum().backward()
        assert torch.allclose(y, dense()) == (step < 2)
    assert int(mlp.step) == 4
    mlp.eval()
    with torch.no_grad():
        mlp(x)
    assert int(mlp.step) == 4  # eval forwards do not count


def test_warmup_switch_compiled_without_recompile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = T.SquaredReLU24MLP(16, 32, T.Sparse24Config(method="mvue", dense_warmup_steps=3))
    counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(mlp, backend=counter)
    x = torch.randn(4, 8, 16)
    outs = []
    for _ in range(6):
        y = compiled(x)
        y.sum().backward()
        outs.append(y.detach())
    assert int(mlp.step) == 6
    dense = torch.relu(x @ mlp.up_proj.weight.t()).square() @ mlp.down_proj.weight.t()
    assert torch.allclose(outs[0], dense.detach())
    assert not torch.allclose(outs[5], dense.detach())  # sparse after the warm-up
    assert counter.frame_count == 1  # the switch is data (a CPU tensor), not a guard


def test_soft_threshold_scale_fixed_once():
    torch.manual_seed(0)
    cfg = T.Sparse24Config(method="soft_threshold", dense_warmup_steps=1)
    mlp = T.SquaredReLU24MLP(16, 32, cfg)
    x = torch.randn(32, 16)
    mlp(x).sum().backward()
    assert math.isnan(mlp.soft_scale.item())  # warm-up: not computed yet
    mlp(x).sum().backward()
    s = mlp.soft_scale.item()
    assert math.isfinite(s) and s > 1.0  # shrinking loses mass; the scale restores it
    mlp(torch.randn(32, 16) * 3).sum().backward()
    assert mlp.soft_scale.item() == s


def test_mvue_eval_is_deterministic():
    mlp = T.SquaredReLU24MLP(16, 32, T.Sparse24Config(dense_warmup_steps=0)).eval()
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.equal(mlp(x), mlp(x))


# -- op registration ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparse", [False, True])
def test_opcheck_ffn(method, sparse):
    x, w1, w2 = weights(t=16, h=8, i=16, dtype=torch.float32)
    args = (x, w1, w2, torch.tensor(sparse), torch.tensor(math.nan if sparse else 1.0))
    opcheck(torch.ops.fxsparse.squared_relu24_ffn, (*args, method, True, 7, 0.25, True, 0))


def test_opcheck_backward_and_schedule():
    x, w1, w2 = weights(t=16, h=8, i=16, dtype=torch.float32)
    y, y1, y2s, counts, scale = ffn(x, w1, w2, True, "naive")
    args = (torch.randn_like(y), x.detach(), w1.detach(), w2.detach(), y1, y2s, counts)
    bwd = torch.ops.fxsparse.squared_relu24_ffn_backward
    opcheck(bwd, (*args, torch.tensor(True), scale, "naive", 0.25, True, 0))
    opcheck(torch.ops.fxsparse.sparse24_schedule, (torch.zeros((), dtype=torch.int64), 2, True))


# -- a short training run: 2:4 must stay near dense -------------------------------------------


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "train24_cpu.py"
    spec = importlib.util.spec_from_file_location("train24_cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_short_training_24_tracks_dense():
    """40 steps (10 dense warm-up) of a tiny byte-level Llama: mvue within 0.15 nats of dense.

    A broken backward (e.g. gradients dropped or mis-permuted) leaves the loss near its
    initial ~5.5 nats while dense reaches ~3; 0.15 nats is ~3x the gap seen at this length.
    """
    pytest.importorskip("gensim")
    bench = _bench()
    kw = dict(steps=40, warmup=10, hidden=64, layers=2, intermediate=128, seq=32, batch=8)
    dense = bench.train(None, progress=False, eval_every=39, **kw)
    sparse = bench.train("mvue", progress=False, eval_every=39, **kw)
    gap = bench.tail_mean(sparse["train_loss"], 10) - bench.tail_mean(dense["train_loss"], 10)
    assert dense["train_loss"][-1] < dense["train_loss"][0] - 1.0  # it learns
    assert gap < 0.15, gap


# -- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_ffn_matches_cpu_reference(method):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need sm80+")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g).bfloat16().cuda().requires_grad_()
    w1 = (torch.randn(256, 128, generator=g) / 11).bfloat16().cuda().requires_grad_()
    w2 = (torch.randn(128, 256, generator=g) / 16).bfloat16().cuda().requires_grad_()
    y, y1, y2s, counts, scale = ffn(x, w1, w2, True, method, seed=1)
    assert P.is_24(y2s) and T.cslt_supported(y2s, w2.t())
    ref = scale.item() * (y2s.float() @ w2.float().t())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    dy = torch.randn_like(y)
    dx, dw1, dw2 = torch.autograd.grad(y, (x, w1, w2), dy)
    # same op on CPU in float32 from the same saved tensors
    args = (dy, x, w1, w2, y1, y2s, counts)
    cpu = [a.detach().float().cpu() for a in args]
    cpu[-1] = counts.cpu()
    want = torch.ops.fxsparse.squared_relu24_ffn_backward(
        *cpu, torch.tensor(True), scale, method, 0.05, True, 0
    )
    # bf16 rounding flips a few near-tied 2:4 choices (token-wise in dW), so single entries may
    # differ a lot: compare by relative norm, the bf16-vs-fp32 bound bench/train24.py also uses.
    for a, b in zip((dx, dw1, dw2), want, strict=True):
        rel = ((a.float().cpu() - b).norm() / b.norm()).item()
        assert rel < 2e-2, rel


def test_autocast_bf16():
    mlp = T.SquaredReLU24MLP(16, 32, T.Sparse24Config(method="naive", dense_warmup_steps=0))
    x = torch.randn(4, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert mlp.up_proj.weight.grad.dtype == torch.float32 and x.grad.isfinite().all()
