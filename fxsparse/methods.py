"""Calibration methods: one pass of statistics, then a plan for any method, target and option.

``collect_method_statistics`` runs the calibration data once with, on each targeted layer, the
observers every requested method needs (plain histogram, per-batch quantiles, norm-scaled and
attribution-scaled histograms). ``plan_from_observers`` then derives a ``SparsityPlan`` for any
target sparsities without touching the data again, so a whole sweep costs one pass per model.

Methods, all writing the same plan format (rules and sources in docs/calibration.md):
``quantile`` (NNCF, seed 000; ``quantile_ema`` for NNCF's per-batch EMA estimator), ``mode``
(SCAP mode-centering, seed 001), ``norm``, ``topk``, ``fat`` and ``pplp`` (Sparsing Law, seed
003), ``attribution`` (Song et al. 2024, seed 002; scores from ``fxsparse.attribution``).

Beyond the seeds: ``allocate_sparsity`` spreads a model-wide budget over layers greedily by
measured output error, so sensitive layers are sparsified less; ``refine_plan`` recalibrates a
plan on the inputs each layer sees once upstream layers are sparse (dense calibration makes deep
layers overshoot their targets).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .observers import LOG2_MIN, ActivationObserver, _magnitude_edges
from .plan import LAYER_METHODS, LayerPlan, SparsityPlan, size_weighted_mean

__all__ = [
    "METHODS",
    "BatchQuantileObserver",
    "ObserverGroup",
    "MethodStatistics",
    "collect_method_statistics",
    "plan_from_observers",
    "column_norms",
    "linear_weight",
    "nncf_ema",
    "cett_curve",
    "allocate_sparsity",
    "plan_perplexity",
    "refine_plan",
]

METHODS = LAYER_METHODS  # the names a plan entry's "method" may take
CENTERS = ("zero", "median", "kde")
EMA_RULES = ("nncf", "pandas", "nncf_legacy")
_GRID = tuple(round(0.01 * i, 2) for i in range(1, 100))  # per-batch quantile levels


# -- observers ----------------------------------------------------------------------------------


class BatchQuantileObserver(ActivationObserver):
    """An ``ActivationObserver`` that also keeps the exact quantiles of |x| of every call.

    NNCF estimates tau per batch and averages batches with an EMA; keeping the quantiles on a
    0.01 grid per call lets the same pass give NNCF's estimate for any target (interpolated
    between grid levels), next to the pooled histogram quantile.
    """

    def __init__(self, name: str, in_features: int, grid: Sequence[float] = _GRID) -> None:
        super().__init__(name, in_features)
        self.grid = torch.tensor(list(grid), dtype=torch.float64)
        self.batch_quantiles: list[Tensor] = []  # one [len(grid)] float64 tensor per call

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        super().forward(x)
        if self.shard is not None:  # a quantile of the whole input needs all of it: gather the slices
            from .sharding import gather_channels

            x = gather_channels(x, self.in_features, self.shard[2])
        v = x.detach().reshape(-1).float().abs()
        v = v[torch.isfinite(v)].sort().values.double()
        if v.numel():
            pos = self.grid.to(v.device) * (v.numel() - 1)  # torch.quantile's "linear" rule
            lo = pos.floor().long()
            hi = torch.clamp(lo + 1, max=v.numel() - 1)
            frac = pos - lo
            self.batch_quantiles.append((v[lo] * (1 - frac) + v[hi] * frac).cpu())
        return x

    def batch_thresholds(self, sparsity: float) -> list[float]:
        """Per-call Quantile(|X_batch|, sparsity), interpolated on the grid."""
        if not self.batch_quantiles:
            raise RuntimeError(f"observer {self.name}: no batches recorded")
        g = np.concatenate([[0.0], self.grid.numpy(), [1.0]])
        out = []
        for q in self.batch_quantiles:
            qs = q.numpy()
            ys = np.concatenate([[0.0], qs, [qs[-1]]])
            out.append(float(np.interp(sparsity, g, ys)))
        return out


def nncf_ema(values: Sequence[float], alpha: float = 0.2, rule: str = "nncf") -> float:
    """Running threshold over batches.

    ``rule="nncf"`` (the default; ``"pandas"`` is the same rule): NNCF 3.4's update, the
    bias-free weighted mean sum beta^i v_{n-i} / sum beta^i with beta = 1 - alpha, computed as
    r_n = (alpha v_n + beta (1 - beta^n) r_{n-1}) / (1 - beta^(n+1)) (``pandas.DataFrame.ewm``
    with ``adjust=True``). ``rule="nncf_legacy"``: an earlier NNCF ``EMAAggregator``'s update,
    r <- alpha v + beta r (1 - beta^n) / (1 - beta^(n+1)), whose weights sum to less than 1 for
    small n, so with few batches it underestimates tau.
    """
    if not values:
        raise ValueError("no values")
    if rule not in EMA_RULES:
        raise ValueError(f"rule must be one of {EMA_RULES}, got {rule!r}")
    beta = 1.0 - alpha
    if rule in ("nncf", "pandas"):
        w = [beta**i for i in range(len(values))][::-1]
        return float(sum(wi * float(v) for wi, v in zip(w, values, strict=True)) / sum(w))
    r = float(values[0])
    for n, v in enumerate(values[1:], start=1):
        r = alpha * float(v) + beta * r * (1 - beta**n) / (1 - beta ** (n + 1))
    return r


class ObserverGroup(nn.Module):
    """Several observers on one layer's input, so one calibration pass feeds every method."""

    def __init__(self, members: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleDict(dict(members))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        for m in self.members.values():
            m(x)
        return x

    @property
    def count(self) -> int:
        return min(int(m.count) for m in self.members.values())

    def set_shard(self, lo: int, hi: int, group: object) -> None:
        """Tensor parallelism: every member sees input channels ``[lo, hi)`` only."""
        for m in self.members.values():
            m.set_shard(lo, hi, group)

    def merge_shards(self) -> None:
        for m in self.members.values():
            m.merge_shards()

    def __getitem__(self, key: str) -> ActivationObserver:
        return self.members[key]


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as ``[out_features, in_features]`` (GPT-2's ``Conv1D`` stores it transposed);
    all of it for a tensor-parallel weight (a collective: every rank must ask for it)."""
    w = module.weight.detach()
    if hasattr(w, "full_tensor"):  # a DTensor
        w = w.full_tensor()
    return w.t() if type(module).__name__ == "Conv1D" else w


def column_norms(weight: Tensor) -> Tensor:
    """||W[:, i]||_2 per input channel of an ``[out, in]`` weight: how much of the output one
    unit of x_i moves."""
    return weight.detach().float().norm(dim=0).cpu()


@dataclass
class MethodStatistics:
    """What one calibration pass recorded: per layer, an ``ObserverGroup``; plus the model facts
    plans need (shapes, fingerprint, skipped layers, column norms, attribution scores)."""

    groups: dict[str, ObserverGroup]
    linears: dict[str, tuple[int, int]]
    model: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # metric -> layer -> a_i
    norms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return max(int(g["plain"].ch_count) for g in self.groups.values())


def collect_method_statistics(
    model: nn.Module,
    dataset: Any,
    layers: Iterable[str],
    *,
    methods: Sequence[str] = ("quantile",),
    metrics: Sequence[str] = (),
    attribution_options: Mapping[str, Any] | None = None,
    scores: Mapping[str, Mapping[str, Tensor]] | None = None,
    skipped: Mapping[str, str] | None = None,
    upstream_plan: SparsityPlan | None = None,
    batch_quantiles: bool = True,
    max_batches: int | None = None,
    progress: bool = True,
) -> MethodStatistics:
    """One calibration pass recording what ``methods`` (and attribution ``metrics``) need.

    Attribution scores need gradients, so they come from extra eager passes first
    (``fxsparse.attribution.attribution_scores``); the histograms then come from one compiled
    calibration pass (``fxsparse.calibration.collect_statistics``). ``scores`` passes
    precomputed attribution scores (``{metric: {layer: a}}``) instead.

    ``upstream_plan``: record each layer's input while ``upstream_plan`` sparsifies every layer
    (eager hooks; each observer sees its layer's input before that layer's own mask). Thresholds
    derived from such statistics account for the shift that sparsifying earlier layers causes
    in later layers' inputs (see ``refine_plan``). ``batch_quantiles=False`` skips the
    per-batch quantiles (a sort per call) that only ``quantile_ema`` needs.
    """
    from .calibration import collect_statistics
    from .plan import linear_layers

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown calibration method(s) {sorted(unknown)}; choose from {METHODS}")
    linears = linear_layers(model)
    layers = list(layers)
    modules = dict(model.named_modules())
    need_norm = "norm" in methods or "pplp" in methods
    scores = {k: dict(v) for k, v in (scores or {}).items()}
    metrics = [m for m in (list(metrics) or (["gxo"] if "attribution" in methods else []))
               if m not in scores]
    if metrics:
        from .attribution import attribution_scores

        data = list(dataset) if max_batches is None else list(dataset)[:max_batches]
        scores.update(attribution_scores(model, data, layers, metrics=metrics,
                                         **dict(attribution_options or {})))
    groups = {}
    norms = {}
    for name in layers:
        in_f = linears[name][1]
        members: dict[str, nn.Module] = {
            "plain": BatchQuantileObserver(name, in_f) if batch_quantiles
            else ActivationObserver(name, in_f)}
        if need_norm:
            norms[name] = column_norms(linear_weight(modules[name]))
            members["norm"] = ActivationObserver(name, in_f, channel_scale=norms[name])
        for metric in scores:
            members["attr_" + metric] = ActivationObserver(name, in_f,
                                                           channel_scale=scores[metric][name])
        groups[name] = ObserverGroup(members)
    if upstream_plan is None:
        collect_statistics(model, dataset, groups, max_batches=max_batches, progress=progress)
    else:
        _collect_eager(model, dataset, groups, upstream_plan, max_batches)
    return MethodStatistics(groups=groups, linears={n: linears[n] for n in layers},
                            model=SparsityPlan.fingerprint(model), skipped=dict(skipped or {}),
                            scores=scores, norms=norms)


@torch.no_grad()
def _collect_eager(model: nn.Module, dataset: Any, groups: Mapping[str, nn.Module],
                   plan: SparsityPlan, max_batches: int | None) -> None:
    from .calibration import _call_kwargs, _model_device, iterate_batches
    from .reference import plan_hooks

    extra = _call_kwargs(model)
    with plan_hooks(model, plan, dict(groups)):
        for i, (args, kwargs) in enumerate(iterate_batches(dataset, _model_device(model))):
            if max_batches is not None and i >= max_batches:
                break
            model(*args, **{**extra, **kwargs})


def refine_plan(
    model: nn.Module,
    dataset: Any,
    plan: SparsityPlan,
    *,
    iterations: int = 1,
    max_batches: int | None = None,
    **options: Any,
) -> SparsityPlan:
    """Recalibrate ``plan`` (same method, targets and ``options``) on statistics recorded while
    the previous plan sparsifies the model, ``iterations`` times.

    Calibrating on the dense model ignores that dropping inputs upstream shrinks and reshapes
    downstream inputs, so deep layers overshoot their target once every layer is sparse; this
    fixed-point step recalibrates each layer on the inputs it sees in the sparse model.
    Methods whose plan does not come from histograms (``topk``, ``fat`` with ``epsilon``,
    ``pplp``) are returned unchanged.
    """
    method = plan.meta.get("method", "quantile")
    if method in ("topk", "pplp") or (method == "fat" and "epsilon" in options):
        return plan
    targets = {n: lp.target_sparsity for n, lp in plan.layers.items()}
    if any(t is None for t in targets.values()):
        raise ValueError("refine_plan needs a target sparsity on every layer")
    metric = options.get("metric", plan.meta.get("metric", "gxo"))
    scores = None
    if method == "attribution":
        scores = {metric: {n: torch.tensor(lp.channel_scale) for n, lp in plan.layers.items()}}
    for _ in range(iterations):
        stats = collect_method_statistics(
            model, dataset, list(plan.layers), methods=(method,), scores=scores,
            metrics=[metric] if method == "attribution" else [], skipped=plan.skipped,
            upstream_plan=plan, batch_quantiles=bool(options.get("quantile_ema")),
            max_batches=max_batches, progress=False)
        new = plan_from_observers(stats, targets, method, **options)
        new.meta.update({k: v for k, v in plan.meta.items() if k not in new.meta})
        new.meta["refined"] = int(plan.meta.get("refined", 0)) + 1
        new.model = plan.model
        plan = new
    return plan


# -- scaled histograms: sparsity and tail energy as functions of tau ---------------------------


def _scaled_cdf(obs: ActivationObserver) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(edges, cumulative share, cumulative share of squared magnitude) of |x - c| * scale."""
    h = obs.scaled_hist.double().cpu().numpy()
    n = h.sum()
    if n == 0:
        raise RuntimeError(f"observer {obs.name}: no activations were recorded")
    edges = np.concatenate([[0.0, 2.0**LOG2_MIN], _magnitude_edges(float(obs.scaled_max))])
    mids = np.sqrt(np.maximum(edges[:-1], 2.0**LOG2_MIN / 2) * edges[1:])  # geometric bin centres
    energy = h * mids**2
    cum = np.concatenate([[0.0], np.cumsum(h)]) / n
    cum_e = np.concatenate([[0.0], np.cumsum(energy)]) / max(energy.sum(), 1e-300)
    return edges, cum, cum_e


def _scaled_sparsity_at(obs: ActivationObserver, tau: float) -> float:
    edges, cum, _ = _scaled_cdf(obs)
    return float(np.interp(tau, edges, cum))


def cett_curve(obs: ActivationObserver, cett: float) -> float:
    """tau at which the tail-error proxy of the norm-scaled input equals ``cett``.

    Sparsing Law's CETT is ||sum_{dropped i} x_i W[:, i]|| / ||sum_i x_i W[:, i]||. The observer
    keeps no activations, so this uses its orthogonal-column proxy
    sqrt(sum_{dropped} (|x_i| ||W_i||)^2 / sum_all (|x_i| ||W_i||)^2) over all calibration entries,
    read from the histogram of |x_i| ||W_i||.
    """
    edges, _, cum_e = _scaled_cdf(obs)
    target = min(max(cett, 0.0), 1.0) ** 2
    return float(np.interp(target, cum_e, edges))


# -- plans from statistics ----------------------------------------------------------------------


def _layer_plan(stats: MethodStatistics, name: str, target: float | None, method: str,
                threshold: float, calibrated: float | None, center: float = 0.0,
                scale: Tensor | None = None) -> LayerPlan:
    out_f, in_f = stats.linears[name]
    return LayerPlan(threshold=float(threshold), in_features=in_f, out_features=out_f,
                     target_sparsity=None if target is None else float(target), method=method,
                     center=float(center),
                     channel_scale=None if scale is None else [float(v) for v in scale.tolist()],
                     calibrated_sparsity=None if calibrated is None else float(calibrated))


def _weights(stats: MethodStatistics, names: Iterable[str]) -> dict[str, float]:
    return {n: float(stats.linears[n][0] * stats.linears[n][1]) for n in names}


def _solve_common(fn, names: list[str], w: dict[str, float], target: float, lo: float, hi: float,
                  increasing: bool = True) -> float:
    """Bisection on a common parameter so the weighted mean of fn(name, p) equals target."""
    tot = sum(w[n] for n in names)

    def mean(p):
        return sum(w[n] * fn(n, p) for n in names) / tot

    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if (mean(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


_OPTIONS = {
    "quantile": {"quantile_ema": False, "ema_alpha": 0.2, "ema_rule": "nncf"},
    "mode": {"center": "zero"},
    "norm": {},
    "topk": {},
    "fat": {"epsilon": None},
    "pplp": {"cett": None, "p": None, "model": None, "data": None},
    "attribution": {"metric": "gxo"},
}


def method_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over the method's defaults (``_OPTIONS``), after the checks that need no
    statistics: the method, another method's option (an error rather than silently ignored),
    the ``mode`` center and, with ``quantile_ema``, the EMA rule."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    unused = set(options) - set(_OPTIONS[method])
    if unused:
        raise TypeError(f"unknown option(s) for method {method!r}: {sorted(unused)}")
    opt = {**_OPTIONS[method], **options}
    if method == "mode" and opt["center"] not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, got {opt['center']!r}")
    if method == "quantile" and opt["quantile_ema"] and opt["ema_rule"] not in EMA_RULES:
        raise ValueError(f"rule must be one of {EMA_RULES}, got {opt['ema_rule']!r}")
    return opt


def plan_from_observers(
    stats: MethodStatistics,
    targets: Mapping[str, float],
    method: str = "quantile",
    **options: Any,
) -> SparsityPlan:
    """A plan for ``targets`` (``{layer: sparsity}``) from one pass's statistics.

    Options per method (defaults in ``_OPTIONS``; formulas in the module docstring):
    quantile: ``quantile_ema``, ``ema_alpha``, ``ema_rule``; mode: ``center``; fat:
    ``epsilon``; pplp: ``cett`` or ``p`` (then also ``model`` and ``data``, the calibration
    batches, to measure perplexity); attribution: ``metric``. Another method's option is an
    error rather than silently ignored.
    """
    opt = method_options(method, options)
    quantile_ema, ema_alpha, ema_rule = opt.get("quantile_ema"), opt.get("ema_alpha"), opt.get("ema_rule")
    center, epsilon, cett, p = opt.get("center"), opt.get("epsilon"), opt.get("cett"), opt.get("p")
    metric, model, data = opt.get("metric"), opt.get("model"), opt.get("data")
    missing = set(targets) - set(stats.groups)
    if missing and method != "topk":
        raise KeyError(f"no statistics for layer(s) {sorted(missing)[:3]}")
    meta: dict[str, Any] = {"method": method}
    layers: dict[str, LayerPlan] = {}
    names = list(targets)
    if method == "quantile":
        meta["quantile_ema"] = quantile_ema
        for n, s in targets.items():
            obs = stats.groups[n]["plain"]
            if quantile_ema:
                if not isinstance(obs, BatchQuantileObserver):
                    raise ValueError("quantile_ema needs statistics collected with batch_quantiles=True")
                tau = nncf_ema(obs.batch_thresholds(s), ema_alpha, ema_rule) if s > 0 else 0.0
                meta.update(ema_alpha=ema_alpha, ema_rule=ema_rule)
            else:
                tau = obs.threshold_for(s)
            layers[n] = _layer_plan(stats, n, s, method, tau, obs.sparsity_at(tau))
    elif method == "mode":
        meta["center"] = center
        for n, s in targets.items():
            obs = stats.groups[n]["plain"]
            c = {"zero": lambda o: 0.0, "median": lambda o: o.quantile(0.5),
                 "kde": lambda o: o.density_peak()}[center](obs)
            tau = obs.threshold_for(s, center=c)
            layers[n] = _layer_plan(stats, n, s, method, tau, obs.sparsity_at(tau, c), center=c)
    elif method in ("norm", "attribution"):
        key = "norm" if method == "norm" else "attr_" + metric
        if method == "attribution":
            meta["metric"] = metric
        for n, s in targets.items():
            if key not in stats.groups[n].members:
                raise KeyError(f"layer {n!r}: calibration did not record {key!r} (collect with "
                               f"methods=[{method!r}]" + (f", metrics=[{metric!r}])" if method ==
                                                          "attribution" else ")"))
            obs = stats.groups[n][key]
            tau = obs.scaled_threshold_for(s)
            layers[n] = _layer_plan(stats, n, s, method, tau, _scaled_sparsity_at(obs, tau),
                                    scale=obs.channel_scale.cpu())
    elif method == "topk":
        for n, s in targets.items():
            out_f, in_f = stats.linears[n]
            from .kernels.topk_linear import topk_keep_count

            layers[n] = _layer_plan(stats, n, s, method, 0.0, 1 - topk_keep_count(in_f, s) / in_f)
        meta["topk"] = "keep k = in_features - round(target_sparsity * in_features) per row"
    elif method == "fat":
        w = _weights(stats, names)
        eps_of: dict[str, float] = {}
        if epsilon is not None:
            eps_of = dict.fromkeys(names, float(epsilon))
        else:
            for s in sorted(set(targets.values())):
                group = [n for n in names if targets[n] == s]
                hi = max(float(stats.groups[n]["plain"].abs_max) for n in group) + 1.0
                eps = _solve_common(lambda n, e: stats.groups[n]["plain"].sparsity_at(e), group, w,
                                    s, 0.0, hi)
                eps_of.update(dict.fromkeys(group, eps))
        meta["epsilon"] = sorted(set(eps_of.values()))
        for n in names:
            obs = stats.groups[n]["plain"]
            sp = obs.sparsity_at(eps_of[n])
            layers[n] = _layer_plan(stats, n, targets[n] if epsilon is None else None, method,
                                    eps_of[n], sp)
    elif method == "pplp":
        w = _weights(stats, names)

        def sp(n, c):
            o = stats.groups[n]["norm"]
            return _scaled_sparsity_at(o, cett_curve(o, c))

        if p is not None:
            if model is None or data is None:
                raise ValueError("pplp with p= needs model= and data= (calibration batches)")
            c, info = _pplp_search(stats, names, p, model, data)
            meta.update(info)
        elif cett is not None:
            c = float(cett)
        else:
            c = _solve_common(sp, names, w, size_weighted_mean(targets, stats.linears), 0.0, 1.0)
        meta["cett"] = c
        for n in names:
            o = stats.groups[n]["norm"]
            tau = cett_curve(o, c)
            layers[n] = _layer_plan(stats, n, targets.get(n) if p is None and cett is None else None,
                                    method, tau, _scaled_sparsity_at(o, tau), scale=stats.norms[n])
    meta["calibration_tokens"] = stats.tokens if stats.groups else 0
    return SparsityPlan(layers=layers, model=stats.model, skipped=dict(stats.skipped), meta=meta)


# -- PPL-p%: search the common CETT budget against perplexity --------------------------------


@torch.no_grad()
def plan_perplexity(model: nn.Module, batches: Sequence[Any], plan: SparsityPlan | None) -> float:
    """Perplexity of ``model`` on token batches with ``plan`` applied by eager hooks."""
    from contextlib import nullcontext

    from .reference import plan_hooks

    nll = 0.0
    n = 0
    with plan_hooks(model, plan) if plan is not None else nullcontext():
        for b in batches:
            ids = b if isinstance(b, Tensor) else b["input_ids"]
            ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum").item()
            n += ids[:, 1:].numel()
    return math.exp(nll / n)


def _pplp_search(stats: MethodStatistics, names: list[str], p: float, model: nn.Module,
                 data: Sequence[Any], steps: int = 10) -> tuple[float, dict[str, Any]]:
    """Largest common CETT budget whose perplexity is at most (1 + p/100) x dense (bisection;
    perplexity is treated as monotone in the budget, which it is up to noise)."""
    dense = plan_perplexity(model, data, None)
    limit = dense * (1 + p / 100.0)
    lo, hi = 0.0, 1.0
    trace = []
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        plan = plan_from_observers(stats, dict.fromkeys(names, 0.0), "pplp", cett=mid)
        ppl = plan_perplexity(model, data, plan)
        trace.append((round(mid, 5), round(ppl, 4)))
        if ppl <= limit:
            lo = mid
        else:
            hi = mid
    return lo, {"p": p, "dense_ppl_calibration": dense, "search": trace}


# -- per-layer allocation under a model-wide budget --------------------------------------------


@torch.no_grad()
def allocate_sparsity(
    model: nn.Module,
    data: Sequence[Any],
    layers: Iterable[str],
    budget: float,
    *,
    levels: Sequence[float] = tuple(round(0.05 * i, 2) for i in range(0, 19)),
    max_tokens: int = 512,
) -> dict[str, float]:
    """Per-layer targets whose weight-size-weighted mean is ``budget``, chosen greedily.

    For every layer and level s, the relative output error e(s) = ||W (x - m_s(x))||^2 /
    ||W x||^2 of thresholding its input at its own s-quantile is measured on up to
    ``max_tokens`` calibration tokens (eager hooks, dense model). Starting from 0, the greedy
    step raises the layer whose next level costs the least error per weight element gained,
    until the budget is met. Uniform targets waste budget on layers whose outputs are sensitive
    (seed 003 observes strongly layer-dependent activation ratios).
    """
    if not 0.0 <= budget < max(levels):
        raise ValueError(f"budget must be in [0, {max(levels)}), got {budget}")
    levels = sorted(set(levels) | {0.0})
    layers = list(layers)
    modules = dict(model.named_modules())
    captured: dict[str, list[Tensor]] = {n: [] for n in layers}
    seen = [0]

    def grab(name):
        def hook(_m, args):
            if sum(t.shape[0] for t in captured[name]) < max_tokens:
                captured[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        return hook

    handles = [modules[n].register_forward_pre_hook(grab(n)) for n in layers]
    try:
        for b in data:
            ids = b if isinstance(b, Tensor) else b["input_ids"]
            model(ids if ids.dim() == 2 else ids.unsqueeze(0), use_cache=False)
            seen[0] += ids.numel()
            if seen[0] >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
    err: dict[str, list[float]] = {}
    size: dict[str, float] = {}
    for n in layers:
        x = torch.cat(captured[n])[:max_tokens]
        wt = linear_weight(modules[n]).float()
        y = x @ wt.t()
        ref = float((y * y).sum()) or 1.0
        a = x.abs().flatten().sort().values
        errs = []
        for s in levels:
            if s == 0:
                errs.append(0.0)
                continue
            tau = a[min(int(s * a.numel()), a.numel() - 1)]
            dropped = torch.where(x.abs() < tau, x, torch.zeros((), dtype=x.dtype))
            d = dropped @ wt.t()
            errs.append(float((d * d).sum()) / ref)
        err[n] = errs
        size[n] = float(wt.numel())
    total = sum(size.values())
    idx = dict.fromkeys(layers, 0)
    achieved = 0.0
    while achieved < budget - 1e-9:
        best, best_cost = None, math.inf
        for n in layers:
            i = idx[n]
            if i + 1 >= len(levels):
                continue
            gain = (levels[i + 1] - levels[i]) * size[n] / total
            cost = max(err[n][i + 1] - err[n][i], 0.0) / gain
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            break
        idx[best] += 1
        achieved = sum(levels[idx[n]] * size[n] for n in layers) / total
    return {n: float(levels[idx[n]]) for n in layers}
