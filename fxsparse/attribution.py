"""Attribution scores per input channel of linear layers, for attribution-based sparsity.

Song et al., "Achieving Sparse Activation in Small Language Models" (2024, arXiv:2406.06562,
seed 002): in small LMs a neuron's magnitude is a poor proxy for its importance, so neurons are
ranked by gradient attributions instead. The plan thresholds ``|x_i| * a_i`` with a static
per-channel ``channel_scale`` a_i, so each metric becomes an a_i such that ``|x_{t,i}| * a_i``,
summed over calibration tokens t, reproduces the metric's own total for channel i. With
g = dL/dx (next-token cross-entropy): ``gradient`` a_i = mean_t |g|; ``gxo`` (gradient x output)
a_i = sum_t |x g| / sum_t |x|; ``ig`` as gxo with g averaged over ``n_steps`` points of the path
alpha * x (one joint path for all targeted inputs); ``snip`` a_i = |sum_t x g| / sum_t |x| (SNIP's
connection sensitivity); ``cor_gxo`` gxo with g averaged between the dense model and one whose
targeted layers already drop their ``ref_sparsity`` share of lowest-GxO inputs (the interdependency
the paper corrects for; its exact term is not published, this trapezoid correction is ours).
``heads=True`` averages a_i over each head's channels of an ``o_proj``, scoring heads as units.
Gradients come from eager forward-pre-hooks (no compiler); the model is not modified.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .plan import linear_shape

__all__ = ["attribution_scores", "METRICS"]

METRICS = ("gradient", "gxo", "ig", "snip", "cor_gxo")


def _ids(b: Any) -> Tensor:
    ids = b if isinstance(b, Tensor) else b["input_ids"]
    ids = torch.as_tensor(ids)
    return ids if ids.dim() == 2 else ids.unsqueeze(0)


def _head_dim(model: nn.Module, name: str, in_features: int) -> int | None:
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if heads and re.search(r"o_proj$|out_proj$|\.dense$", name) and in_features % heads == 0:
        return getattr(cfg, "head_dim", None) or in_features // heads
    return None


class _Tap:
    """Forward-pre-hooks that scale / mask the targeted inputs and keep them for autograd."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.modules = dict(model.named_modules())
        self.layers = list(layers)
        self.alpha = 1.0
        self.mask_scale: dict[str, Tensor] | None = None  # cor_gxo's sparsified operating point
        self.ref_sparsity = 0.5
        self.inputs: dict[str, Tensor] = {}
        self.handles = []

    def __enter__(self) -> _Tap:
        for n in self.layers:
            self.handles.append(self.modules[n].register_forward_pre_hook(self._hook(n)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, name):
        def hook(_m, args):
            x = args[0]
            if self.mask_scale is not None:
                d = x.detach().abs().float() * self.mask_scale[name].to(x.device)
                tau = d.flatten().kthvalue(max(1, int(self.ref_sparsity * d.numel()))).values
                x = torch.where(d <= tau, torch.zeros((), dtype=x.dtype), x)
            if self.alpha != 1.0:
                x = x * self.alpha
            self.inputs[name] = x
            return (x, *args[1:])
        return hook


def _loss(model: nn.Module, ids: Tensor) -> Tensor:
    logits = model(ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="sum")


def _grads(model: nn.Module, tap: _Tap, ids: Tensor) -> dict[str, Tensor]:
    tap.inputs = {}
    loss = _loss(model, ids)
    names = [n for n in tap.layers if n in tap.inputs]
    gs = torch.autograd.grad(loss, [tap.inputs[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(tap.inputs[n]) if g is None else g).detach().float()
            for n, g in zip(names, gs, strict=True)}


def attribution_scores(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[str],
    *,
    metrics: Sequence[str] = ("gxo",),
    n_steps: int = 8,
    ref_sparsity: float = 0.5,
    heads: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """``{metric: {layer: a (float32 [in_features], >= 0)}}`` over ``batches`` of token ids.

    See the module docstring for each metric's formula.
    """
    bad = set(metrics) - set(METRICS)
    if bad:
        raise ValueError(f"unknown attribution metric(s) {sorted(bad)}; choose from {METRICS}")
    batches = [_ids(b).to(next(model.parameters()).device) for b in batches]
    if not batches:
        raise ValueError("attribution needs at least one batch")
    layers = list(layers)
    modules = dict(model.named_modules())
    sums: dict[str, dict[str, Tensor]] = {
        k: {n: torch.zeros(linear_shape(modules[n])[1], dtype=torch.float64) for n in layers}
        for k in ("abs_x", "abs_g", "abs_xg", "xg", "abs_xg_ig", "abs_xg_cor")}
    tokens = 0
    was_training = model.training
    model.eval()
    want = set(metrics)
    try:
        with torch.enable_grad(), _Tap(model, layers) as tap:
            for ids in batches:  # dense gradients: gradient, gxo, snip (and cor_gxo's first half)
                tap.alpha, tap.mask_scale = 1.0, None
                xs = {}
                grads = _grads(model, tap, ids)
                for n, g in grads.items():
                    x = tap.inputs[n].detach().float()
                    xs[n] = x
                    flat_x, flat_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
                    sums["abs_x"][n] += flat_x.abs().sum(0).double()
                    sums["abs_g"][n] += flat_g.abs().sum(0).double()
                    sums["abs_xg"][n] += (flat_x * flat_g).abs().sum(0).double()
                    sums["xg"][n] += (flat_x * flat_g).sum(0).double()
                tokens += ids.numel()
                if "ig" in want:
                    acc = {n: torch.zeros_like(x) for n, x in xs.items()}
                    for k in range(n_steps):
                        tap.alpha = (k + 0.5) / n_steps
                        for n, g in _grads(model, tap, ids).items():
                            acc[n] += g * tap.alpha  # d/dx of f(alpha x) is alpha f'(alpha x)
                    tap.alpha = 1.0
                    for n, x in xs.items():
                        sums["abs_xg_ig"][n] += (x * acc[n] / n_steps).reshape(-1, x.shape[-1]) \
                            .abs().sum(0).double()
            if "cor_gxo" in want:  # second pass at the sparsified operating point
                gxo = {n: (sums["abs_xg"][n] / sums["abs_x"][n].clamp_min(1e-30)).float()
                       for n in layers}
                tap.mask_scale, tap.ref_sparsity = gxo, ref_sparsity
                for ids in batches:
                    tap.mask_scale = None
                    dense_g = _grads(model, tap, ids)
                    xs = {n: tap.inputs[n].detach().float() for n in dense_g}
                    tap.mask_scale = gxo
                    sparse_g = _grads(model, tap, ids)
                    for n, x in xs.items():
                        g = 0.5 * (dense_g[n] + sparse_g.get(n, dense_g[n]))
                        sums["abs_xg_cor"][n] += (x * g).reshape(-1, x.shape[-1]).abs().sum(0).double()
                tap.mask_scale = None
    finally:
        model.train(was_training)

    out: dict[str, dict[str, Tensor]] = {}
    for metric in metrics:
        out[metric] = {}
        for n in layers:
            ax = sums["abs_x"][n].clamp_min(1e-30)
            a = {"gradient": sums["abs_g"][n] / max(tokens, 1),
                 "gxo": sums["abs_xg"][n] / ax,
                 "ig": sums["abs_xg_ig"][n] / ax,
                 "snip": sums["xg"][n].abs() / ax,
                 "cor_gxo": sums["abs_xg_cor"][n] / ax}[metric]
            hd = _head_dim(model, n, a.numel()) if heads else None
            if hd:
                a = a.reshape(-1, hd).mean(1, keepdim=True).expand(-1, hd).reshape(-1)
            out[metric][n] = a.float().clamp_min(0.0).contiguous()
    return out
