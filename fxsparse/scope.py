"""Which linear layers a method applies to: ``TargetScope`` and ``IgnoredScope`` over module names.

Names are module paths as ``model.named_modules()`` prints them (``model.layers.3.mlp.down_proj``).
``names`` match exactly; ``patterns`` are regular expressions matched against the *whole* name
(``re.fullmatch``), as in NNCF's ``sparsify_activations`` (seed 000).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["TargetScope", "IgnoredScope", "ScopeError", "resolve_targets"]


class ScopeError(ValueError):
    """A scope does not fit the model: no match, a conflict, or a bad sparsity value."""


def _tuple(values: Iterable[str] | str | None, what: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):  # a lone string is a common slip: treat it as one entry
        values = [values]
    out = tuple(values)
    for v in out:
        if not isinstance(v, str):
            raise TypeError(f"{what} must be strings, got {type(v).__name__}: {v!r}")
    return out


def _compile(patterns: tuple[str, ...], owner: str) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ScopeError(f"{owner}: invalid regular expression {p!r}: {e}") from None
    return tuple(compiled)


@dataclass(frozen=True)
class _Scope:
    names: tuple[str, ...] = field(default=())
    patterns: tuple[str, ...] = field(default=())

    def __init__(self, names: Iterable[str] | str | None = None,
                 patterns: Iterable[str] | str | None = None) -> None:
        object.__setattr__(self, "names", _tuple(names, f"{type(self).__name__}.names"))
        object.__setattr__(self, "patterns", _tuple(patterns, f"{type(self).__name__}.patterns"))
        _compile(self.patterns, repr(self))  # fail at construction on a bad regex

    def matches(self, name: str) -> bool:
        return name in self.names or any(
            re.fullmatch(p, name) for p in self.patterns
        )

    def select(self, candidates: Iterable[str]) -> list[str]:
        return [c for c in candidates if self.matches(c)]

    def is_empty(self) -> bool:
        return not self.names and not self.patterns


class TargetScope(_Scope):
    """Layers a target sparsity applies to: exact ``names`` and/or full-match regex ``patterns``."""


class IgnoredScope(_Scope):
    """Layers left dense whatever the target scopes say. Unknown exact names are an error."""


def _nearest(name: str, candidates: list[str], n: int = 3) -> str:
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.0)
    return ", ".join(close) if close else "(the model has no linear layers)"


def resolve_targets(
    linear_names: Iterable[str],
    target_sparsity_by_scope: Mapping[TargetScope, float],
    ignored_scope: IgnoredScope | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Map each targeted linear layer to its sparsity.

    Returns ``(targets, skipped)``: ``targets[name] = sparsity`` and ``skipped[name] = reason``
    for every other linear layer, so inspection can say why a layer stayed dense.

    Raises ``ScopeError`` when a scope matches no linear layer (naming the nearest names), when
    two scopes give one layer different targets, when a sparsity is outside [0, 1), or when an
    ignored scope names a layer that does not exist.
    """
    candidates = list(linear_names)
    if not target_sparsity_by_scope:
        raise ScopeError("target_sparsity_by_scope is empty: name at least one TargetScope")
    ignored = ignored_scope or IgnoredScope()
    for name in ignored.names:
        if name not in candidates:
            raise ScopeError(
                f"IgnoredScope names {name!r}, which is not a linear layer of the model; "
                f"nearest: {_nearest(name, candidates)}"
            )

    targets: dict[str, float] = {}
    owner: dict[str, TargetScope] = {}
    for scope, sparsity in target_sparsity_by_scope.items():
        if not isinstance(scope, TargetScope):
            raise TypeError(f"keys of target_sparsity_by_scope must be TargetScope, got {scope!r}")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise ScopeError(f"{scope}: sparsity must be a number in [0, 1), got {sparsity!r}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ScopeError(f"{scope}: sparsity must be in [0, 1), got {sparsity}")
        if scope.is_empty():
            raise ScopeError("a TargetScope with neither names nor patterns matches nothing")
        for name in scope.names:
            if name not in candidates:
                raise ScopeError(
                    f"{scope}: {name!r} is not a linear layer of the model; "
                    f"nearest: {_nearest(name, candidates)}"
                )
        for pattern in scope.patterns:
            if not any(re.fullmatch(pattern, c) for c in candidates):
                raise ScopeError(
                    f"{scope}: pattern {pattern!r} matches no linear layer (patterns must match "
                    f"the whole name); nearest: {_nearest(pattern, candidates)}"
                )
        for name in scope.select(candidates):
            if name in targets and targets[name] != float(sparsity):
                raise ScopeError(
                    f"layer {name!r} is claimed by {owner[name]} (sparsity {targets[name]}) and "
                    f"by {scope} (sparsity {sparsity})"
                )
            targets[name] = float(sparsity)
            owner[name] = scope

    skipped: dict[str, str] = {}
    for name in candidates:
        if ignored.matches(name):
            skipped[name] = "ignored_scope"
            targets.pop(name, None)
        elif name not in targets:
            skipped[name] = "no TargetScope matches it"
    return targets, skipped
