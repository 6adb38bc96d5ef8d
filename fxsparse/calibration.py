"""``fxsparse.calibrate``: run data through an observed graph and derive a ``SparsityPlan``.

The recipe, as in PT2E quantization: compile the model with ``sparse_act`` in calibration mode
(the observe pass puts an ``ActivationObserver`` on the input of each targeted linear), run the
calibration data through it, then turn each observer's statistics into a ``LayerPlan``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .observers import ActivationObserver
from .plan import LayerPlan, SparsityPlan, linear_layers
from .scope import IgnoredScope, TargetScope, resolve_targets

__all__ = ["calibrate", "collect_statistics", "iterate_batches", "METHODS"]

METHODS = ("quantile",)


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
    become tensors.
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
        yield (), kwargs


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


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    dataset: Any,
    observers: Mapping[str, ActivationObserver],
    *,
    max_batches: int | None = None,
    progress: bool = True,
    desc: str = "calibrating",
) -> None:
    """Run ``dataset`` through ``model`` compiled in calibration mode, feeding ``observers``."""
    compiled = torch.compile(model, backend="sparse_act", options={"observers": dict(observers)})
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
) -> SparsityPlan:
    """Calibrate per-layer thresholds so each targeted layer drops its target share of inputs.

    Args:
        model: the model (e.g. a Hugging Face causal LM); it is not modified.
        dataset: an iterable of token-id tensors, of dicts of model kwargs, or a
            ``datasets.Dataset`` with ``input_ids``.
        target_sparsity_by_scope: ``{TargetScope(...): sparsity in [0, 1)}``.
        ignored_scope: layers to leave dense whatever the targets say.
        method: ``"quantile"``: tau = Quantile(|X|, s) over all calibration tokens of the layer
            (NNCF ``sparsify_activations``, seed 000).
        max_batches: stop after this many batches.
        progress: show a progress bar.

    Returns:
        A ``SparsityPlan``; ``plan.save(path)`` writes it as JSON.

    Example::

        plan = fxsparse.calibrate(model, batches,
                                  {TargetScope(patterns=[r".*mlp\\..*_proj"]): 0.4},
                                  IgnoredScope(names=["lm_head"]))
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    linears = linear_layers(model)
    targets, skipped = resolve_targets(linears, target_sparsity_by_scope, ignored_scope)
    observers = {name: ActivationObserver(name, linears[name][1]) for name in targets}
    collect_statistics(model, dataset, observers, max_batches=max_batches, progress=progress)

    layers = {}
    for name, target in targets.items():
        obs = observers[name]
        threshold = obs.threshold_for(target)
        out_f, in_f = linears[name]
        layers[name] = LayerPlan(
            threshold=threshold,
            in_features=in_f,
            out_features=out_f,
            target_sparsity=target,
            method=method,
            calibrated_sparsity=obs.sparsity_at(threshold),
        )
    return SparsityPlan(
        layers=layers,
        model=SparsityPlan.fingerprint(model),
        skipped=skipped,
        meta={"method": method,
              "calibration_tokens": max(int(o.ch_count) for o in observers.values())},
    )
