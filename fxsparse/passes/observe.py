"""Observe pass: insert an observer module on the input of each named linear layer.

Pre: ``match_linears`` has run (linear nodes carry ``LinearSite``s).
Post: for every site whose name is in ``observers``, the linear's input goes through a
``call_module`` node ``fxsparse_observer_<n>`` (visible in the graph and its code) that returns
its input unchanged (``meta["fxsparse_observer"]`` is set on it). Observers are shared
objects: a layer called twice, or seen by several graphs after graph breaks, feeds one observer.
Sites without an observer are left alone.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import fx, nn

from .match import linear_sites

__all__ = ["insert_observers"]


def _input_of(node: fx.Node, kind: str) -> tuple[fx.Node, str | int]:
    if kind == "conv1d":  # addmm(bias, x, W)
        return node.args[1], 1
    if node.op == "call_module":
        return node.args[0], 0
    if "input" in node.kwargs:
        return node.kwargs["input"], "input"
    return node.args[0], 0


def insert_observers(
    gm: fx.GraphModule, observers: Mapping[str, nn.Module], resolve=None
) -> fx.GraphModule:
    """Route the input of each observed linear through its observer (see module docstring).

    ``resolve`` maps a site's module name to the observers' key (default: identity), so graphs
    of a sub-module compiled on its own still find their layer.
    """
    attr_of: dict[int, str] = {}
    count = 0
    for node, site in linear_sites(gm):
        key = resolve(site.name) if resolve else site.name
        if key is None or key not in observers:
            continue
        obs = observers[key]
        if id(obs) not in attr_of:
            attr_of[id(obs)] = f"fxsparse_observer_{len(attr_of)}"
            gm.add_submodule(attr_of[id(obs)], obs)
        x, slot = _input_of(node, site.kind)
        with gm.graph.inserting_before(node):
            obs_node = gm.graph.call_module(attr_of[id(obs)], (x,))
        # the traced value (Dynamo graphs: example_value) lets the lower pass see row counts
        obs_node.meta.update({k: v for k, v in x.meta.items()
                              if k in ("val", "tensor_meta", "example_value")})
        obs_node.meta["fxsparse_observer"] = True
        if isinstance(slot, str):
            node.update_kwarg(slot, obs_node)
        else:
            node.update_arg(slot, obs_node)
        count += 1
    gm.meta["fxsparse_observed"] = count
    gm.graph.lint()
    gm.recompile()
    return gm
