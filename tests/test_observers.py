import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsparse import ActivationObserver


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.95), st.sampled_from([0.0, 0.1, -0.3]),
       st.sampled_from(["normal", "laplace", "relu", "lognormal"]))
def test_threshold_hits_any_target_after_one_pass(seed, target, center, dist):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, 16, generator=g)
    if dist == "laplace":
        x = torch.sign(x) * torch.empty_like(x).exponential_(generator=g)
    elif dist == "relu":
        x = torch.relu(x) + 0.01 * torch.rand(x.shape, generator=g)  # an atom near zero
    elif dist == "lognormal":
        x = torch.exp(2 * x) * 1e-3
    obs = ActivationObserver("l", 16)
    for part in x.split(700):  # streaming: several batches
        obs(part)
    tau = obs.threshold_for(target, center)
    achieved = ((x - center).abs() < tau).float().mean().item()
    assert abs(achieved - target) < 0.005  # +-0.5 points
    assert abs(obs.sparsity_at(tau, center) - achieved) < 0.005


def test_quantile_median_and_density_peak():
    g = torch.Generator().manual_seed(0)
    x = 0.7 + 0.2 * torch.randn(20000, 8, generator=g)
    obs = ActivationObserver("l", 8)
    obs(x)
    assert obs.quantile(0.5) == pytest.approx(x.median().item(), abs=2e-3)
    assert obs.density_peak() == pytest.approx(0.7, abs=0.05)
    # a skewed distribution: its mode is not its median
    y = torch.distributions.Gamma(2.0, 4.0).sample((40000,)).reshape(-1, 8)
    obs2 = ActivationObserver("g", 8)
    obs2(y)
    assert obs2.density_peak() == pytest.approx(0.25, abs=0.06)  # mode (k-1)/rate
    assert obs2.quantile(0.5) > 0.35


def test_non_finite_values_are_not_counted():
    obs = ActivationObserver("l", 4)
    obs(torch.tensor([[1.0, float("nan"), float("inf"), -2.0]]))
    assert obs.count == 2
    assert torch.isfinite(obs.ch_sum).all()
    assert obs.abs_max.item() == 2.0


def test_scaled_histogram():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4000, 32, generator=g)
    s = torch.rand(32, generator=g) * 3 + 0.1
    obs = ActivationObserver("l", 32, channel_scale=s)
    obs(x)
    for q in (0.2, 0.5, 0.8):
        tau = obs.scaled_threshold_for(q)
        assert abs(((x.abs() * s) < tau).float().mean().item() - q) < 0.005


def test_probe_counts_exactly_and_memory_is_bounded():
    obs = ActivationObserver("l", 8)
    obs.set_probe(0.5, None, None)
    before = sum(b.numel() for b in obs.buffers())
    x = torch.randn(100, 8)
    for _ in range(3):
        obs(x)
    assert sum(b.numel() for b in obs.buffers()) == before
    stats = obs.probe_stats()
    want = (x.abs() < 0.5).float()
    assert stats["sparsity"] == want.sum().item() / want.numel()
    assert stats["token_std"] == pytest.approx(want.mean(1).std(unbiased=False).item(), abs=1e-6)
    assert stats["tokens"] == 300
    # the observer state survives a state_dict round trip
    other = ActivationObserver("l", 8)
    other.load_state_dict(obs.state_dict())
    assert other.threshold_for(0.4) == obs.threshold_for(0.4)


def test_edges_are_monotone():
    obs = ActivationObserver("l", 2)
    obs(torch.tensor([[1e-9, 7e4], [-3.0, 0.0]]))
    edges, cum = obs._signed_cdf()
    assert np.all(np.diff(edges) > 0) and cum[-1] == 4
    assert math.isclose(obs.quantile(1.0), 7e4)


def test_errors_name_the_layer():
    obs = ActivationObserver("model.layers.0.mlp.up_proj", 8)
    with pytest.raises(RuntimeError, match="up_proj: no activations"):
        obs.threshold_for(0.5)
    with pytest.raises(ValueError, match="up_proj: input has 4 features"):
        obs(torch.randn(2, 4))


@pytest.mark.parametrize("scale", [1e-9, 1e6])
def test_scaled_threshold_at_extreme_scales(scale):
    """|x| * scale far outside 2^-24..2^16 (a narrower grid's range) still hits the target."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4096, 64, generator=g) * torch.tensor([1.0, 1e5]).repeat(32)  # raw up to ~1e5
    s = torch.full((64,), scale) * (torch.rand(64, generator=g) + 0.5)
    obs = ActivationObserver("l", 64, channel_scale=s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in range: no out-of-range warning
        obs(x)
        for target in (0.1, 0.5, 0.9):
            tau = obs.scaled_threshold_for(target)
            assert abs(((x.abs() * s) < tau).float().mean().item() - target) < 0.01


@pytest.mark.parametrize("center", [0.0, 0.3])
def test_threshold_for_raw_values_above_2_pow_16(center):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 64, generator=g) * 1e5
    obs = ActivationObserver("l", 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obs(x)
        for target in (0.1, 0.5, 0.9, 0.999):
            tau = obs.threshold_for(target, center)
            assert abs(((x - center).abs() < tau).float().mean().item() - target) < 0.01


def test_values_outside_the_grid_are_counted_and_warn():
    obs = ActivationObserver("l", 4, channel_scale=torch.ones(4))
    obs(torch.tensor([[1e25, -1e25, 1e-30, 0.0], [1.0, -2.0, 3.0, -4.0]]))
    assert obs.count == 8 and obs.signed_outside.tolist() == [1, 1, 1]
    assert obs.scaled_outside.tolist() == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 4.0 <= obs.threshold_for(0.75) <= 1e25  # in the grid: between 4 and 1e25
    with pytest.warns(UserWarning, match="outside the histogram's range"):
        obs.threshold_for(0.85)  # among the two 1e25 (lumped into the top bins)
    with pytest.warns(UserWarning, match="outside the histogram's range"):
        obs.scaled_threshold_for(0.2)  # between 0 and 1e-30 (lumped into the zero bin)


@pytest.mark.parametrize("stats", [True, False])
def test_probe_counts_non_finite_as_kept_like_the_op(stats):
    from fxsparse.kernels import keep_mask_reference

    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, inf, 0.5, 2.0], [-inf, 0.1, nan, -3.0]])
    c, s = torch.tensor([0.0, 0.1, 0.0, 0.2]), torch.tensor([1.0, 2.0, 0.5, 1.0])
    obs = ActivationObserver("l", 4)
    obs.set_probe(1.0, c, s, stats=stats)
    obs(x)
    want = ~keep_mask_reference(x, 1.0, c, s)
    assert obs.probe_stats()["sparsity"] == want.float().mean().item() == 0.25


def test_a_probe_without_statistics_holds_no_histogram():
    obs = ActivationObserver("p", 8)
    obs.set_probe(0.5, None, None, stats=False)
    assert obs.signed_hist.numel() == 0
    obs(torch.randn(4, 8))
    assert obs.probe_dropped > 0
    obs.set_probe(0.5, None, None, stats=True)  # statistics again: full size, recording
    obs(torch.randn(4, 8))
    assert obs.signed_hist.sum() == 32
