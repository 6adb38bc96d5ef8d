"""``SparsityPlan``: what to sparsify and how, as plain versioned JSON (data, never code).

A plan holds, per planned linear (by module name), a ``LayerPlan``: ``threshold`` (drop x_i when
``|x_i - center| * scale_i < threshold``), ``center`` (a float or one per input), ``channel_scale``
(``None`` or one per input), ``target_sparsity``, ``method``, the layer's shape, the
``calibrated_sparsity``, and ``prefill`` / ``decode_rows``: what calls with more than
``decode_rows`` rows run (``"threshold"``, ``"dense"``, or ``"2:4"`` from the measured row-count
crossover on). Beside the layers: ``skipped`` (every other linear, with the reason), the model's
fingerprint (``[out_features, in_features]`` per linear) and free-form ``meta``. The JSON schema
(format ``fxsparse.plan``, version 1) is in docs/plan.md; ``decode_rows`` is an additive field,
so version-1 files without it load unchanged.

``save`` writes a temporary file in the same folder and renames it over the target, so a crash
never leaves a half-written plan; the file gets the usual mode (0o666 less the umask). ``load``
validates everything and names the offending layer or field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fileio import write_text_atomic

__all__ = ["LayerPlan", "SparsityPlan", "PlanError", "linear_layers", "linear_shape", "PLAN_FORMAT",
           "PLAN_VERSION", "LAYER_METHODS"]

PLAN_FORMAT = "fxsparse.plan"
PLAN_VERSION = 1
PREFILL_KINDS = ("threshold", "dense", "2:4")
# The calibration methods (``methods.METHODS`` is this tuple; methods imports this module, not
# the other way). Lowering only tells "topk" from the rest, so a typo would silently run the
# threshold op: ``validate`` rejects unknown names.
LAYER_METHODS = ("quantile", "mode", "norm", "topk", "fat", "pplp", "attribution")


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model it is applied to."""


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(out_features, in_features)`` of a linear layer: ``nn.Linear``, or the ``Conv1D`` of
    GPT-2-style models (a linear whose weight is stored ``[in, out]``), else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return int(module.nf), int(module.nx)
    return None


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile(model)`` wrapper holds (else ``model``): its parameters are
    the same, and its module names carry no ``_orig_mod.`` prefix."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` for every linear layer of ``model`` (of
    the module inside, for a ``torch.compile`` wrapper)."""
    return {name: shape for name, m in uncompiled(model).named_modules()
            if (shape := linear_shape(m)) is not None}


def size_weighted_mean(values: Mapping[str, float], shapes: Mapping[str, tuple[int, int]]) -> float:
    """Mean of per-layer ``values`` weighted by each layer's weight size (out x in features from
    ``shapes``, e.g. :func:`linear_layers`): for sparsities, the share of multiply-adds skipped."""
    w = {n: shapes[n][0] * shapes[n][1] for n in values}
    return sum(w[n] * values[n] for n in values) / sum(w.values())


def name_candidates(names: Collection[str], module_name: str) -> list[str]:
    """The names a module path could mean: itself, else every name ending in ``.module_name``,
    else the longest name it ends with.

    The suffix rule lets a plan made on ``LlamaForCausalLM`` apply when a user compiles only
    its inner ``model`` (whose graphs name ``layers.0.mlp.up_proj``); the other way round,
    a name that ends in an entry (a module holding the model, compiled) takes that entry.
    """
    if module_name in names:
        return [module_name]
    hits = [k for k in names if k.endswith("." + module_name)]
    if hits:
        return hits
    inner = [k for k in names if module_name.endswith("." + k)]
    return [max(inner, key=len)] if inner else []


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _vector_or_scalar(value: Any, in_features: int, what: str, layer: str, *, positive: bool,
                      allow_none: bool) -> None:
    if value is None:
        if allow_none:
            return
        raise PlanError(f"layer {layer!r}: {what} is missing")
    if isinstance(value, list):
        if len(value) != in_features:
            raise PlanError(
                f"layer {layer!r}: {what} has {len(value)} entries, in_features is {in_features}"
            )
        values = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if what == "channel_scale":
            raise PlanError(f"layer {layer!r}: channel_scale must be a list or null")
        values = [value]
    else:
        raise PlanError(f"layer {layer!r}: {what} must be a number or a list, got {value!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise PlanError(f"layer {layer!r}: {what} holds a non-finite or non-number {v!r}")
        if positive and v < 0:
            raise PlanError(f"layer {layer!r}: {what} holds a negative value {v}")


@dataclass
class LayerPlan:
    """How one linear layer is sparsified. ``center``/``channel_scale``: float or per-channel list."""

    threshold: float
    in_features: int
    out_features: int
    target_sparsity: float | None = None
    method: str = "quantile"
    center: float | list[float] = 0.0
    channel_scale: list[float] | None = None
    calibrated_sparsity: float | None = None
    prefill: str = "threshold"
    decode_rows: int = 16

    def validate(self, name: str) -> None:
        for key in ("in_features", "out_features"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise PlanError(f"layer {name!r}: {key} must be a positive integer, got {v!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise PlanError(f"layer {name!r}: threshold must be a number >= 0 (inf allowed), got {t!r}")
        ts = self.target_sparsity
        if ts is not None and not (_is_number(ts) and 0.0 <= ts < 1.0):
            raise PlanError(f"layer {name!r}: target_sparsity must be null or a number in [0, 1), got {ts!r}")
        if not isinstance(self.method, str) or self.method not in LAYER_METHODS:
            raise PlanError(f"layer {name!r}: method must be one of {LAYER_METHODS}, got {self.method!r}")
        cs = self.calibrated_sparsity
        if cs is not None and not (_is_number(cs) and 0.0 <= cs <= 1.0):
            raise PlanError(f"layer {name!r}: calibrated_sparsity must be null or a number in [0, 1], "
                            f"got {cs!r}")
        _vector_or_scalar(self.center, self.in_features, "center", name, positive=False,
                          allow_none=False)
        _vector_or_scalar(self.channel_scale, self.in_features, "channel_scale", name,
                          positive=True, allow_none=True)
        if self.prefill not in PREFILL_KINDS:
            raise PlanError(f"layer {name!r}: prefill must be one of {PREFILL_KINDS}, got {self.prefill!r}")
        d = self.decode_rows
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise PlanError(f"layer {name!r}: decode_rows must be an integer >= 0, got {d!r}")
        if self.method == "topk" and ts is None:
            raise PlanError(f"layer {name!r}: method 'topk' needs target_sparsity (the fraction of each "
                            "row's channels to drop)")
        if self.prefill != "threshold" and self.method == "topk":
            raise PlanError(f"layer {name!r}: prefill={self.prefill!r} is not supported for method "
                            "'topk' (top-k layers run the top-k op at every row count)")
        if self.prefill == "2:4" and self.in_features % 4:
            raise PlanError(f"layer {name!r}: prefill='2:4' needs in_features divisible by 4, "
                            f"got {self.in_features}")

    @property
    def drops_nothing(self) -> bool:
        """A threshold entry that keeps every input (|x - c| * s >= tau for all x, NaN included),
        i.e. the dense layer exactly (e.g. a 0% target). Not top-k or 2:4-prefill entries, which
        prune regardless of the threshold."""
        if self.method == "topk" or self.prefill == "2:4" or self.threshold > 0:
            return False
        return self.channel_scale is None or min(self.channel_scale) >= 0

    def center_tensor(self) -> torch.Tensor | None:
        """The center as a float32 tensor (0-d or [in_features]); None when it is exactly zero."""
        if isinstance(self.center, list):
            return torch.tensor(self.center, dtype=torch.float32)
        return None if self.center == 0.0 else torch.tensor(float(self.center), dtype=torch.float32)

    def scale_tensor(self) -> torch.Tensor | None:
        if self.channel_scale is None:
            return None
        return torch.tensor(self.channel_scale, dtype=torch.float32)


_LAYER_KEYS = {f for f in LayerPlan.__dataclass_fields__}


@dataclass
class SparsityPlan:
    """Per-layer thresholds for a model; see the module docstring for the JSON schema."""

    layers: dict[str, LayerPlan]
    model: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- construction ---------------------------------------------------------------------------
    @staticmethod
    def fingerprint(model: nn.Module) -> dict[str, Any]:
        return {
            "class": type(model).__name__,
            "linears": {k: list(v) for k, v in linear_layers(model).items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "layers": {name: asdict(lp) for name, lp in self.layers.items()},
            "skipped": dict(self.skipped),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "plan") -> SparsityPlan:
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a plan is a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: 'format' is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        version = data.get("version")
        if not (isinstance(version, int) and not isinstance(version, bool) and version == PLAN_VERSION):
            raise PlanError(
                f"{source}: plan version {data.get('version')!r} is not supported "
                f"(this fxsparse reads version {PLAN_VERSION})"
            )
        raw_layers = data.get("layers")
        if not isinstance(raw_layers, Mapping):
            raise PlanError(f"{source}: 'layers' must be an object of layer name -> settings")
        unknown = set(data) - {"format", "version", "model", "layers", "skipped", "meta"}
        if unknown:
            raise PlanError(f"{source}: unknown top-level keys {sorted(unknown)}")
        for key in ("model", "skipped", "meta"):
            if data.get(key) is not None and not isinstance(data[key], Mapping):
                raise PlanError(f"{source}: {key!r} must be an object, got {type(data[key]).__name__}")
        layers = {}
        for name, raw in raw_layers.items():
            if not isinstance(raw, Mapping):
                raise PlanError(f"{source}: layer {name!r} must be an object")
            unknown = set(raw) - _LAYER_KEYS
            if unknown:
                raise PlanError(f"{source}: layer {name!r} has unknown keys {sorted(unknown)}")
            try:
                lp = LayerPlan(**raw)
            except TypeError as e:
                raise PlanError(f"{source}: layer {name!r}: {e}") from None
            lp.validate(name)
            layers[name] = lp
        skipped = dict(data.get("skipped") or {})
        for name, reason in skipped.items():
            if not isinstance(name, str) or not isinstance(reason, str):
                raise PlanError(f"{source}: 'skipped' maps layer names to reasons (strings), got "
                                f"{name!r}: {reason!r}")
        model = dict(data.get("model") or {})
        if model.get("linears") is not None and not isinstance(model["linears"], Mapping):
            raise PlanError(f"{source}: 'model.linears' must be an object of layer name -> "
                            f"[out_features, in_features], got {type(model['linears']).__name__}")
        return cls(layers=layers, model=model, skipped=skipped, meta=dict(data.get("meta") or {}))

    def set_prefill(self, prefill: str, decode_rows: int | None = None,
                    names: list[str] | None = None) -> SparsityPlan:
        """Set ``prefill`` (and ``decode_rows`` when given) on ``names`` (default: every layer);
        validates and returns the plan itself."""
        updated = {}
        for name in self.layers if names is None else names:
            if name not in self.layers:
                raise PlanError(f"set_prefill: {name!r} is not a layer of the plan")
            lp = self.layers[name]
            new = replace(lp, prefill=prefill,
                          decode_rows=lp.decode_rows if decode_rows is None else decode_rows)
            new.validate(name)  # all or nothing: nothing changes when one layer rejects it
            updated[name] = new
        self.layers.update(updated)
        return self

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON atomically (temp file in the same folder, then rename).

        A plan from a tensor-parallel calibration (``meta["tensor_parallel"]``; every rank holds
        the same plan) is written by rank 0 of the ``torch.distributed`` job only; the other
        ranks return the path without waiting for the file."""
        from .sharding import writes_files

        for name, lp in self.layers.items():
            lp.validate(name)
        path = Path(path)
        if self.meta.get("tensor_parallel") and not writes_files():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> SparsityPlan:
        """Read and validate a plan; with ``model``, also check that it fits that model."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"no plan file at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: malformed JSON ({e})") from None
        plan = cls.from_dict(data, source=str(path))
        if model is not None:
            plan.check_model(model)
        return plan

    @classmethod
    def coerce(cls, plan: SparsityPlan | str | os.PathLike | Mapping[str, Any]) -> SparsityPlan:
        """Accept a plan object, a path to its JSON, or its dict form."""
        if isinstance(plan, SparsityPlan):
            return plan
        if isinstance(plan, (str, os.PathLike)):
            return cls.load(plan)
        if isinstance(plan, Mapping):
            return cls.from_dict(plan)
        raise TypeError(f"plan must be a SparsityPlan, a path or a dict, got {type(plan).__name__}")

    # -- checks against a model -----------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise ``PlanError`` unless every planned layer is a linear of ``model`` of that shape."""
        linears = linear_layers(model)
        for name in self.layers:
            if name not in linears:
                raise PlanError(
                    f"plan layer {name!r} is not a linear layer of this {type(model).__name__} "
                    "(plan made for another model?)"
                )
            self.check_shape(name, linears[name])
        recorded = self.model.get("linears")
        if recorded:
            extra = sorted(set(linears) - set(recorded))
            if extra:
                raise PlanError(
                    f"the model has linear layers the plan's model did not have, e.g. {extra[0]!r} "
                    "(plan made for another model?)"
                )

    def check_shape(self, name: str, out_in: tuple[int, int]) -> None:
        lp = self.layers[name]
        if (lp.out_features, lp.in_features) != tuple(out_in):
            raise PlanError(
                f"layer {name!r}: plan is for out_features={lp.out_features}, "
                f"in_features={lp.in_features}, the model's weight is {tuple(out_in)}"
            )

    def candidates(self, module_name: str) -> list[str]:
        """The plan entries a module path could mean (``name_candidates`` over the entries)."""
        return name_candidates(self.layers, module_name)

    def resolve(self, module_name: str) -> str | None:
        """The plan entry for a module path, if ``candidates`` finds exactly one."""
        hits = self.candidates(module_name)
        return hits[0] if len(hits) == 1 else None

    def skip_reason(self, module_name: str) -> str:
        for key in (module_name, *[k for k in self.skipped if k.endswith("." + module_name)]):
            if key in self.skipped:
                return self.skipped[key]
        return "not in the plan"

    def summary(self) -> str:
        rows = [f"{'layer':48s} {'target':>6s} {'calib':>6s} {'threshold':>10s} method"]
        for name, lp in self.layers.items():
            t = "-" if lp.target_sparsity is None else f"{lp.target_sparsity:.3f}"
            c = "-" if lp.calibrated_sparsity is None else f"{lp.calibrated_sparsity:.3f}"
            rows.append(f"{name:48s} {t:>6s} {c:>6s} {lp.threshold:10.4g} {lp.method}")
        return "\n".join(rows)
