"""``fxsparse.evaluate``: what a plan costs in quality and what sparsity it really achieves.

Perplexity over sliding windows of held-out tokens (no token scored twice; which ones are scored
is in ``sliding_windows``), next-token agreement between the sparse and the dense model, and per
layer the dropped fraction measured exactly on that text (mean over all entries, and the spread
of the per-token fraction).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import topk_keep_count, topk_keep_mask_reference
from .observers import ActivationObserver
from .plan import LayerPlan, SparsityPlan, uncompiled
from .reference import plan_hooks

__all__ = ["evaluate", "EvalResult", "sliding_windows", "TopkProbe", "make_probe"]


class TopkProbe(ActivationObserver):
    """Probe for a ``topk`` layer: counts what ``fxsparse::topk_linear`` drops in each row."""

    def __init__(self, name: str, in_features: int, k: int, center: Tensor | None,
                 channel_scale: Tensor | None) -> None:
        super().__init__(name, in_features)
        self.k, self.center, self.scale = k, center, channel_scale

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        v = x.detach()
        if self.shard is not None:  # tensor parallelism: the k largest of the whole row
            from .sharding import gather_channels

            v = gather_channels(v, self.in_features, self.shard[2])
        v = v.reshape(-1, self.in_features)
        c = None if self.center is None else self.center.to(v.device)
        s = None if self.scale is None else self.scale.to(v.device)
        dropped = (~topk_keep_mask_reference(v, self.k, c, s)).double()
        frac = dropped.mean(1)
        self.probe_dropped += dropped.sum().cpu()
        self.probe_tokens += v.shape[0]
        self.probe_frac_sum += frac.sum().cpu()
        self.probe_frac_sumsq += (frac**2).sum().cpu()
        return x


def make_probe(name: str, lp: LayerPlan) -> ActivationObserver:
    """An exact probe of what ``lp``'s op drops (threshold or top-k)."""
    if lp.method == "topk":
        return TopkProbe(name, lp.in_features, topk_keep_count(lp.in_features, lp.target_sparsity or 0.0),
                         lp.center_tensor(), lp.scale_tensor())
    probe = ActivationObserver(name, lp.in_features)
    probe.set_probe(lp.threshold, lp.center_tensor(), lp.scale_tensor(), stats=False)
    return probe


@dataclass
class EvalResult:
    tokens: int
    dense_ppl: float
    sparse_ppl: float | None = None
    agreement: float | None = None  # share of positions where sparse and dense argmax agree
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # measured sparsity

    def table(self, plan: SparsityPlan | None = None) -> str:
        lines = [f"{'layer':44s} {'target':>6s} {'sparsity':>8s} {'±token':>7s}"]
        for name, st in self.layers.items():
            t = plan.layers[name].target_sparsity if plan is not None else None
            lines.append(f"{name:44s} {'-' if t is None else format(t, '.2f'):>6s} "
                         f"{st['sparsity']:8.3f} {st['token_std']:7.3f}")
        if self.layers:
            worst = max(self.layers.items(), key=lambda kv: abs(kv[1]["sparsity"] - (
                plan.layers[kv[0]].target_sparsity or 0.0)) if plan else 0.0)
            lines.append(f"worst layer: {worst[0]} ({worst[1]['sparsity']:.3f})")
        lines.append(f"tokens scored: {self.tokens}")
        lines.append(f"perplexity dense {self.dense_ppl:.3f}" + (
            "" if self.sparse_ppl is None else
            f", sparse {self.sparse_ppl:.3f} ({100 * (self.sparse_ppl / self.dense_ppl - 1):+.2f}%),"
            f" next-token agreement {100 * self.agreement:.1f}%"))
        return "\n".join(lines)


def sliding_windows(ids: torch.Tensor, window: int, stride: int
                    ) -> Iterator[tuple[torch.Tensor, int]]:
    """``(window ids [1, <=window], number of leading positions not to score)`` pairs.

    Windows start every ``stride`` tokens; the last one ends at the end of ``ids``. As in
    Hugging Face's perplexity-with-stride recipe, ``evaluate`` scores in each window the tokens
    no earlier window covered (positions ``skip`` on), each predicted from the tokens before it
    in the window, except position 0, the label of no position. So the first window scores its
    tokens 1..L-1 (L its length); with ``stride < window`` each later window scores its last
    ``stride`` tokens (fewer in the last one) after ``window - stride`` tokens of context, and
    every token of ``ids`` but the first is scored once; with ``stride == window``
    (``evaluate``'s default) the windows do not overlap, and the first token of each window has
    no context in it and is never scored: ``len(ids)`` minus the number of windows are scored.
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    n = ids.numel()
    start = prev_end = 0
    while True:
        end = min(start + window, n)
        yield ids[start:end].unsqueeze(0), max(prev_end - start, 0)
        if end >= n:
            return
        prev_end = end
        start += stride


def _window_count(n: int, window: int, stride: int) -> int:
    return max(1, math.ceil(max(n - window, 0) / stride) + 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ids: torch.Tensor,
    plan: SparsityPlan | None = None,
    *,
    window: int = 256,
    stride: int | None = None,
    max_windows: int | None = None,
    sparse_model: Any = None,
    progress: bool = True,
    engine: str = "compile",
    dense_cache: dict[int, tuple[float, torch.Tensor]] | None = None,
) -> EvalResult:
    """Score ``ids`` (1-D token ids) with the dense model, and with ``plan`` if given.

    The sparse side runs the model compiled by ``sparse_act`` with an exact probe on each
    planned layer (Inductor off, so the probes, which are Python modules, can run); pass
    ``sparse_model`` to score another compiled model instead (probes are then skipped).
    ``engine="hooks"`` applies the plan with eager hooks instead (same masks, no Dynamo: cheaper
    when one process scores many plans). ``dense_cache`` (a dict, filled on first use) keeps the
    dense model's loss and argmax per window, so a sweep runs the dense model once.

    Every token is scored with the decode-time masks, as TEAL measures perplexity: a layer's
    ``prefill`` setting (dense or 2:4 for many-row calls) would otherwise make a window's single
    forward pass dense and hide what the plan costs when generating.
    """
    if engine not in ("compile", "hooks"):
        raise ValueError(f"engine must be 'compile' or 'hooks', got {engine!r}")
    stride = stride or window
    ids = ids.reshape(-1)
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 (or None: all), got {max_windows}")
    model = uncompiled(model)  # a torch.compile wrapper: score the module it holds
    device = next(model.parameters()).device
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    probes: dict[str, ActivationObserver] = {}
    hooks = None
    if plan is not None and sparse_model is None:
        plan.check_model(model)
        if any(lp.prefill != "threshold" for lp in plan.layers.values()):
            plan = SparsityPlan.from_dict(plan.to_dict()).set_prefill("threshold")
        probes = {name: make_probe(name, lp) for name, lp in plan.layers.items()}
        if engine == "hooks":
            hooks = probes
            sparse_model = model
        else:
            sparse_model = torch.compile(model, backend="sparse_act", options={
                "plan": plan, "observers": probes, "inductor": False})

    total = _window_count(ids.numel(), window, stride)
    if max_windows is not None:
        total = min(total, max_windows)
    it = sliding_windows(ids, window, stride)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=total, desc="evaluating", unit="window")
    nll_dense = nll_sparse = 0.0
    agree = count = 0
    for i, (chunk, skip) in enumerate(it):
        if i >= total:
            break
        chunk = chunk.to(device)
        lo = max(skip - 1, 0)  # logits at position p predict token p + 1
        target = chunk[0, lo + 1:]
        if dense_cache is not None and i in dense_cache:
            nll, top = dense_cache[i]
        else:
            logits = model(chunk, **extra).logits[0, lo:-1].float()
            nll, top = F.cross_entropy(logits, target, reduction="sum").item(), logits.argmax(-1)
            if dense_cache is not None:
                dense_cache[i] = (nll, top)
        nll_dense += nll
        if sparse_model is not None:
            if hooks is not None:
                with plan_hooks(model, plan, hooks):
                    s_logits = model(chunk, **extra).logits[0, lo:-1].float()
            else:
                s_logits = sparse_model(chunk, **extra).logits[0, lo:-1].float()
            nll_sparse += F.cross_entropy(s_logits, target, reduction="sum").item()
            agree += (s_logits.argmax(-1) == top).sum().item()
        count += target.numel()
    if count == 0:
        raise ValueError("no tokens to score: the text is shorter than two tokens")
    result = EvalResult(tokens=count, dense_ppl=math.exp(nll_dense / count))
    if sparse_model is not None:
        result.sparse_ppl = math.exp(nll_sparse / count)
        result.agreement = agree / count
    result.layers = {name: p.probe_stats() for name, p in probes.items()}
    return result
