"""Match pass: find the linear layers of a graph and name each after its module.

Pre: ``gm`` is a graph Dynamo hands a backend (``F.linear`` calls whose weights are placeholders
lifted from parameters; ``node.meta`` carries ``nn_module_stack`` and the placeholders'
``grapharg`` source), or a ``torch.fx.symbolic_trace`` graph (``call_module`` on ``nn.Linear``).

GPT-2's ``Conv1D`` (``addmm(b, x, W)`` with ``W`` stored ``[in, out]``) counts as a linear too.

Post: every linear node carries ``node.meta["fxsparse_site"]``, a ``LinearSite`` with the module
name as ``model.named_modules()`` spells it (``model.layers.0.mlp.up_proj``). The graph itself
is unchanged. A module called twice gives two sites with the same name; graphs split by graph
breaks are matched independently, each by the same rules.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..sharding import dtensor_source

__all__ = ["LinearSite", "linear_args", "match_linears", "linear_sites", "module_path", "mutation_epochs"]

_LINEAR_TARGETS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
_ADDMM_TARGETS = {torch.addmm, torch.ops.aten.addmm.default}
SITE_KEY = "fxsparse_site"
_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift}


@dataclass(frozen=True)
class LinearSite:
    """One linear call in a graph. ``weight_index`` is the weight's placeholder position, if any."""

    name: str
    node_name: str
    weight_index: int | None
    kind: str  # "call_function" (F.linear), "call_module" (nn.Linear) or "conv1d" (GPT-2 addmm)


def module_path(source: str) -> str:
    """``L['self'].model.layers[0]._modules['mlp']`` -> ``model.layers.0.mlp``.

    The root is the compiled module: ``L['self']`` up to torch 2.12, ``L['args'][0]`` from 2.13
    (Dynamo traces the module's ``__call__``, whose first argument it is)."""
    s = re.sub(r"^(?:[A-Za-z_]\w*)\[['\"][^'\"]*['\"]\](?:\[\d+\])?", "", source)  # the root
    s = re.sub(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]*)['\"]\]", r".\1", s)
    s = re.sub(r"\[['\"]([^'\"]*)['\"]\]", r".\1", s)
    s = re.sub(r"\[(\d+)\]", r".\1", s)
    return s.strip(".")


def linear_args(node: fx.Node) -> tuple[fx.Node, object, object] | None:
    """(x, weight, bias) of an ``F.linear`` call node, else None."""
    if node.op == "call_function" and node.target in _LINEAR_TARGETS:
        args = list(node.args) + [None] * (3 - len(node.args))
        x = node.kwargs.get("input", args[0])
        w = node.kwargs.get("weight", args[1])
        b = node.kwargs.get("bias", args[2])
        return x, w, b
    return None


def _conv1d_args(node: fx.Node) -> tuple[fx.Node, object, object] | None:
    """``addmm(bias, x, W_in_out)`` called from a GPT-2 ``Conv1D``: (x, W [in, out], bias)."""
    if node.op == "call_function" and node.target in _ADDMM_TARGETS and not node.kwargs:
        stack = node.meta.get("nn_module_stack")
        if stack and getattr(list(stack.values())[-1][1], "__name__", "") == "Conv1D":
            b, x, w = node.args[:3]
            return x, w, b
    return None


def _name_from_weight(w: object) -> str | None:
    """The parameter's owner module, from the placeholder's Dynamo source."""
    if isinstance(w, fx.Node) and w.op == "placeholder":
        grapharg = w.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if source is not None:
            name = source.name() if callable(source.name) else source.name  # method before 2.12
            path = module_path(name)
            if path.endswith(".weight"):
                return path[: -len(".weight")]
    return None


def _name_from_stack(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    return module_path(path)


def match_linears(gm: fx.GraphModule) -> fx.GraphModule:
    """Annotate linear nodes with ``LinearSite``s (see module docstring)."""
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    for node in gm.graph.nodes:
        site = None
        args = linear_args(node)
        if args is not None:
            _, w, _ = args
            # The calling module names the layer (a tied lm_head's weight is sourced from the
            # embedding); the weight's source is the fallback for graphs without module stacks.
            name = _name_from_stack(node) or _name_from_weight(w)
            if name is not None:
                # a local weight that is ``to_local()`` of a DTensor parameter (tensor parallelism,
                # ``sharding.py``): the parameter's placeholder holds the weight
                source = dtensor_source(w)
                index = placeholders.get(w if source is None else source)
                site = LinearSite(name, node.name, index, "call_function")
        elif (args := _conv1d_args(node)) is not None:
            name = _name_from_stack(node)
            if name is not None:
                site = LinearSite(name, node.name, placeholders.get(args[1]), "conv1d")
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
            site = LinearSite(str(node.target), node.name, None, "call_module")
        if site is not None:
            node.meta[SITE_KEY] = site
    return gm


def linear_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, LinearSite]]:
    """The annotated linear nodes of ``gm`` in graph order."""
    return [(n, n.meta[SITE_KEY]) for n in gm.graph.nodes if SITE_KEY in n.meta]


def _mutates(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may write a tensor in place (conservative: ``x.mul_()``, ``x += y``,
    ``x[i] = y``, ``out=``, ``inplace=True``, mutable aten schemas, in-place modules)."""
    if node.op == "call_method":
        return (node.target.endswith("_") and not node.target.startswith("_")) or node.target == "__setitem__"
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if node.op != "call_function":
        return False
    t = node.target
    if t in _INPLACE_OPERATORS or "out" in node.kwargs or node.kwargs.get("inplace") is True:
        return True
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.is_mutable
    name = getattr(t, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def mutation_epochs(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Per node, how many nodes before it may mutate a tensor in place.

    Dynamo graphs are not functional: a node read again after ``x.mul_()`` sees the new value.
    Passes that move a computation or reuse one (one mask for siblings, one launch for q/k/v,
    an activation recomputed at its reader) may do so only between nodes of the same epoch."""
    epochs, n = {}, 0
    for node in gm.graph.nodes:
        epochs[node] = n
        n += _mutates(gm, node)
    return epochs
