"""``fxsparse.calibrate``: run data through an observed graph and derive a ``SparsityPlan``.

The recipe, as in PT2E quantization: compile the model with ``sparse_act`` in calibration mode
(the observe pass puts an ``ActivationObserver`` on the input of each targeted linear), run the
calibration data through it, then turn each observer's statistics into a ``LayerPlan``
(``fxsparse.methods``: one pass serves every target sparsity of a method).

On a tensor-parallel model (DTensor weights, ``sharding.py``) every rank runs the same data;
observers of row-parallel layers see their rank's slice and are merged across ranks at the end
of the pass, so every rank derives the unsharded model's plan (rank 0's is broadcast).
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .methods import METHODS, method_options
from .observers import ActivationObserver, observed_tokens
from .plan import LayerPlan, SparsityPlan, linear_layers, uncompiled
from .scope import IgnoredScope, ScopeError, TargetScope, resolve_targets
from .sharding import is_tensor_parallel, same_on_every_rank

__all__ = ["calibrate", "collect_statistics", "iterate_batches", "METHODS"]


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")


def iterate_batches(dataset: Any, device: torch.device
                    ) -> Iterable[tuple[tuple[Any, ...], dict[str, Any]]]:
    """``(args, kwargs)`` for the model, for each element of ``dataset``.

    Tensors (token ids for a language model; 1-D ids get a batch dimension) are passed
    positionally, dicts as keyword arguments; ``datasets.Dataset`` rows are dicts whose lists
    become tensors. While the caller runs a dict's batch, observers skip the positions its
    ``attention_mask`` marks as padding (``observers.observed_tokens``).
    """
    for i, item in enumerate(dataset):
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
            item = item[0]
        if isinstance(item, torch.Tensor):
            if item.dim() == 1 and not torch.is_floating_point(item):
                item = item.unsqueeze(0)
            yield (item.to(device),), {}
            continue
        if not isinstance(item, Mapping):
            raise TypeError(
                f"calibration item {i}: expected a tensor or a dict of model kwargs, "
                f"got {type(item).__name__}"
            )
        kwargs = {}
        for k, v in item.items():
            if isinstance(v, list):
                v = torch.tensor(v)
            if isinstance(v, torch.Tensor):
                if k in ("input_ids", "attention_mask") and v.dim() == 1:
                    v = v.unsqueeze(0)
                v = v.to(device)
            kwargs[k] = v
        mask = kwargs.get("attention_mask")
        with observed_tokens(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None):
            yield (), kwargs  # the caller runs the model on it inside this block


def _call_kwargs(model: nn.Module) -> dict[str, Any]:
    # A KV cache is of no use while calibrating and only adds graph inputs.
    config = getattr(model, "config", None)
    return {"use_cache": False} if config is not None and hasattr(config, "use_cache") else {}


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _private_call(model: nn.Module) -> Callable[..., Any]:
    """``model(*args, **kwargs)`` through a function with a code object of its own.

    Dynamo keeps its per-code state (the shapes seen, from which automatic dynamic shapes marks a
    size dynamic on the next compile; cached graphs) on the compiled frame's code object. Compiled
    directly, calibration on windows of other shapes would leave ``model.forward``'s state behind,
    and the user's own ``torch.compile(model, ...)`` of a two-row decode step would then trace
    the row count as dynamic (its mask left to Inductor instead of the fused kernel). A fresh code
    object per call is forgotten with it. Frames Dynamo compiles after a graph break inside the
    model are still the model's own.
    """

    def call(*args, **kwargs):
        return model(*args, **kwargs)

    return types.FunctionType(call.__code__.replace(), call.__globals__, "fxsparse_calibration",
                              call.__defaults__, call.__closure__)


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    dataset: Any,
    observers: Mapping[str, ActivationObserver | nn.Module],
    *,
    max_batches: int | None = None,
    progress: bool = True,
    desc: str = "calibrating",
) -> None:
    """Run ``dataset`` through ``model`` compiled in calibration mode, feeding ``observers``.

    An observer is any module with ``forward(x) -> x`` and a ``count`` of what it recorded
    (``ActivationObserver``, or ``methods.ObserverGroup`` holding several).
    """
    compiled = torch.compile(_private_call(model), backend="sparse_act",
                             options={"observers": dict(observers)})
    device = _model_device(model)
    extra = _call_kwargs(model)
    total = _length(dataset)
    if max_batches is not None:
        total = min(total, max_batches) if total is not None else max_batches
    was_training = model.training
    model.eval()
    try:
        batches = _progress(iterate_batches(dataset, device), total, desc, progress)
        for i, (args, kwargs) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            compiled(*args, **{**extra, **kwargs})
    finally:
        model.train(was_training)
    for o in observers.values():  # tensor parallelism: row-parallel observers saw slices (sharding.py)
        merge = getattr(o, "merge_shards", None)
        if merge is not None:
            merge()
    silent = [name for name, o in observers.items() if o.count == 0]
    if silent:
        raise RuntimeError(
            f"calibration recorded nothing for {len(silent)} layer(s), e.g. {silent[0]!r}: the "
            "dataset was empty, the layer is never called, or Dynamo fell back to eager "
            "(recompile limit reached? try torch.compiler.reset())"
        )


def calibrate(
    model: nn.Module,
    dataset: Any,
    target_sparsity_by_scope: Mapping[TargetScope, float],
    ignored_scope: IgnoredScope | None = None,
    method: str = "quantile",
    *,
    max_batches: int | None = None,
    progress: bool = True,
    refine: int = 0,
    prefill: str | Mapping[TargetScope, str] = "threshold",
    decode_rows: int | None = None,
    **options: Any,
) -> SparsityPlan:
    """Calibrate per-layer thresholds so each targeted layer drops its target share of inputs.

    Args:
        model: the model (e.g. a Hugging Face causal LM); it is not modified.
        dataset: an iterable of token-id tensors, of dicts of model kwargs, or a
            ``datasets.Dataset`` with ``input_ids``. Lists, datasets and ``DataLoader``s are
            iterated once per pass; a one-shot iterator (a generator) is read once into a list
            (its first ``max_batches`` batches) when the method or ``refine`` needs more than
            one pass over the data.
        target_sparsity_by_scope: ``{TargetScope(...): sparsity in [0, 1)}``.
        ignored_scope: layers to leave dense whatever the targets say.
        method: one of ``METHODS`` (details and formulas in docs/calibration.md):
            ``"quantile"``: tau = Quantile(|X|, s) (NNCF, seed 000; ``quantile_ema=True``,
            ``ema_alpha``: NNCF's per-batch EMA estimate); ``"mode"``: SCAP mode-centering
            (seed 001; ``center="zero"|"median"|"kde"``); ``"norm"``: |x_i| * ||W[:, i]||
            (seed 003); ``"topk"``: per-token top-k; ``"fat"``: one absolute threshold
            (``epsilon=``); ``"pplp"``: per-layer thresholds from a common tail-error budget,
            ``p=`` for PPL-p% on the calibration text; ``"attribution"``: gradient attributions
            (seed 002; ``metric=``, ``n_steps=``, ``ref_sparsity=``, ``heads=``).
        max_batches: stop after this many batches.
        progress: show a progress bar.
        refine: recalibrate this many times on the inputs layers see while the previous plan
            sparsifies the model (``methods.refine_plan``), so deep layers meet their targets
            in the sparse model, not only in the dense one.
        prefill: what calls with more than ``decode_rows`` rows run: ``"threshold"`` (the
            threshold op at every row count), ``"dense"`` (plain linear, TEAL-style dense
            prefill) or ``"2:4"`` (2:4 activations on sparse tensor cores above the measured
            row-count crossover, dense below it); one kind for every calibrated layer, or
            ``{TargetScope: kind}`` per scope (other layers keep ``"threshold"``).
        decode_rows: calls with at most this many rows always run the threshold op (16).
        **options: the method's options (above).

    Returns:
        A ``SparsityPlan``; ``plan.save(path)`` writes it as JSON.

    Example::

        plan = fxsparse.calibrate(model, batches,
                                  {TargetScope(patterns=[r".*mlp\\..*_proj"]): 0.4},
                                  IgnoredScope(names=["lm_head"]), method="mode", center="median")
    """
    from .methods import collect_method_statistics, plan_from_observers, refine_plan

    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    model = uncompiled(model)  # a torch.compile wrapper: calibrate the module it holds
    linears = linear_layers(model)
    targets, skipped = resolve_targets(linears, target_sparsity_by_scope, ignored_scope)
    if not targets:
        ignored = [n for n, why in skipped.items() if why == "ignored_scope"]
        raise ScopeError(f"ignored_scope leaves none of the {len(ignored)} targeted linears to calibrate "
                         f"(e.g. {ignored[0] if ignored else '?'})")
    attr_keys = ("n_steps", "ref_sparsity", "heads")
    attr_opts = {k: options.pop(k) for k in attr_keys if k in options}
    if attr_opts and method != "attribution":
        raise TypeError(f"option(s) {sorted(attr_opts)} only apply to method 'attribution'")
    _check_arguments(method, targets, linears, options, prefill, decode_rows)
    tensor_parallel = is_tensor_parallel(model)
    if tensor_parallel:
        _check_tensor_parallel(method, refine, options)
    metrics = [options.get("metric", "gxo")] if method == "attribution" else []
    data = dataset
    if method == "pplp" and options.get("p") is not None:  # the search re-reads a list
        data = list(itertools.islice(dataset, max_batches))
        options.update(model=model, data=data)
    elif refine or method == "attribution":  # gradient pass, then the histogram pass
        data = _reiterable(dataset, max_batches)
    stats = collect_method_statistics(
        model, data, targets, methods=(method,), metrics=metrics, attribution_options=attr_opts,
        skipped=skipped, batch_quantiles=bool(options.get("quantile_ema")),
        max_batches=max_batches, progress=progress)
    plan = plan_from_observers(stats, targets, method, **options)
    if refine:
        plan = refine_plan(model, data, plan, iterations=refine, max_batches=max_batches,
                           **options)
    if tensor_parallel:  # every rank computed it from the same merged statistics; rank 0's is the one
        plan.meta["tensor_parallel"] = torch.distributed.get_world_size()
        plan = same_on_every_rank(plan)
    if isinstance(prefill, str):
        return plan.set_prefill(prefill, decode_rows)
    for scope, kind in prefill.items():
        plan.set_prefill(kind, decode_rows, names=scope.select(plan.layers))
    return plan


def _check_tensor_parallel(method: str, refine: int, options: Mapping[str, Any]) -> None:
    """Raise for what calibration cannot do on a tensor-parallel model: the passes that run the
    model eagerly with a plan's hooks or gradients (``refine``, ``attribution``, ``pplp`` with
    ``p``) see DTensors or local slices there. The unsharded model's plan applies as it is."""
    what = ("refine" if refine else f"method {method!r}" if method == "attribution"
            else "method 'pplp' with p=" if method == "pplp" and options.get("p") is not None else None)
    if what is not None:
        raise ValueError(f"calibrate: {what} is not supported on a tensor-parallel model; calibrate the "
                         "unsharded model on one device and compile the sharded one with its plan")


def _reiterable(dataset: Any, max_batches: int | None) -> Any:
    """``dataset`` itself if iterating it again starts over (lists, ``datasets.Dataset``,
    ``DataLoader``), else, for a one-shot iterator (``iter(it) is it``: a generator), its first
    ``max_batches`` items as a list, so every pass sees the same batches. Tested as an
    ``Iterator`` rather than by calling ``iter``, which would start a ``DataLoader``'s workers."""
    return list(itertools.islice(dataset, max_batches)) if isinstance(dataset, Iterator) else dataset


def _check_arguments(method: str, targets: Mapping[str, float],
                     linears: Mapping[str, tuple[int, int]], options: Mapping[str, Any],
                     prefill: str | Mapping[TargetScope, str], decode_rows: int | None) -> None:
    """Raise, before any data is read, the errors that ``plan_from_observers`` (its
    ``method_options``), the attribution pass and ``set_prefill`` would raise only after the
    calibration pass (same types and messages)."""
    opt = method_options(method, options)
    if method == "attribution":
        from .attribution import METRICS

        if opt["metric"] not in METRICS:
            raise ValueError(f"unknown attribution metric(s) {[opt['metric']]}; choose from {METRICS}")
    epsilon = opt["epsilon"] if method == "fat" else None
    threshold = 0.0 if epsilon is None else float(epsilon)
    scopes = {None: prefill} if isinstance(prefill, str) else prefill
    for scope, kind in scopes.items():
        names = list(targets) if scope is None else scope.select(targets)
        if scope is not None and not names:
            raise ValueError(f"prefill scope {scope!r} matches no calibrated layer")
        for name in names:  # the entry as the plan will have it, calibrated threshold aside
            out_f, in_f = linears[name]
            LayerPlan(threshold=threshold, in_features=in_f, out_features=out_f,
                      target_sparsity=targets[name], method=method, prefill=kind,
                      decode_rows=16 if decode_rows is None else decode_rows).validate(name)
