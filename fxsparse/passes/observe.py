"""Observe pass: insert an observer module on the input of each named linear layer.

Pre: ``match_linears`` has run (linear nodes carry ``LinearSite``s).
Post: for every site whose name is in ``observers``, the linear's input goes through a
``call_module`` node ``fxsparse_observer_<n>`` (visible in the graph and its code) that returns
its input unchanged (``meta["fxsparse_observer"]`` is set on it). Observers are shared
objects: a layer called twice, or seen by several graphs after graph breaks, feeds one observer.
Sites without an observer are left alone.

Tensor parallelism (``sharding.py``): the observer sees this rank's tensor, the full input of a
column-parallel layer or the slice of a row-parallel one (``observer.set_shard``; the ranks'
statistics are merged after calibration). For a linear on DTensors, it is put on the tensor the
engine's ``DTensor.from_local`` wraps; a layout fxsparse does not slice is observed whole
(``x.full_tensor()``, a collective).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import fx, nn

from .. import sharding
from ..plan import PlanError
from .match import linear_args, linear_sites

__all__ = ["insert_observers"]


def _input_of(node: fx.Node, kind: str) -> tuple[fx.Node, str | int]:
    if kind == "conv1d":  # addmm(bias, x, W)
        return node.args[1], 1
    if node.op == "call_module":
        return node.args[0], 0
    if "input" in node.kwargs:
        return node.kwargs["input"], "input"
    return node.args[0], 0


def _value(node: object) -> object:
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None


def _local_slot(graph: fx.Graph, linear: fx.Node, x: fx.Node) -> tuple[fx.Node, fx.Node, str | int | None]:
    """Where to observe the local tensor of a linear's DTensor input ``x``: ``(owner, tensor,
    slot)``, the observer's output replacing ``owner``'s input ``slot``. The tensor the engine's
    ``DTensor.from_local`` wrapped, so a lowered site still reads it through the observer;
    otherwise ``x.to_local()``, observed on the side (``slot`` None)."""
    local = sharding.local_input(graph, x) if sharding.is_from_local(x) else None
    if local is not None:
        return x, local, ("local_tensor" if "local_tensor" in x.kwargs else 0)
    with graph.inserting_before(linear):
        local = sharding.local_input(graph, x)
    return linear, local, None


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
        owner = node  # the node whose input ``slot`` the observer's output replaces
        shard = None
        if site.kind == "call_function":  # tensor parallelism: the observer sees this rank's tensor
            w = linear_args(node)[1]
            shard = sharding.site_sharding(x, w, _value(sharding.dtensor_source(w) or w))
        if shard is not None and shard.reason is not None:  # a layout not sliced: observe it whole
            if not shard.on_dtensors:
                raise PlanError(f"layer {site.name!r}: tensor parallel: {shard.reason}; leave it out of "
                                "the calibration (IgnoredScope) or calibrate the unsharded model")
            with gm.graph.inserting_before(node):
                x = gm.graph.call_method("full_tensor", (x,))
            owner, slot = node, None
        elif shard is not None:
            if shard.layout.kind == "rowwise":
                obs.set_shard(shard.layout.lo, shard.layout.hi, shard.layout.group)
            if shard.on_dtensors:  # observe the engine's local tensor; the linear keeps its DTensor
                owner, x, slot = _local_slot(gm.graph, node, x)
        with gm.graph.inserting_before(owner):
            obs_node = gm.graph.call_module(attr_of[id(obs)], (x,))
        # the traced value (Dynamo graphs: example_value) lets the lower pass see row counts
        obs_node.meta.update({k: v for k, v in x.meta.items()
                              if k in ("val", "tensor_meta", "example_value")})
        obs_node.meta["fxsparse_observer"] = True
        if slot is None:
            pass  # observes ``x.to_local()`` or ``x.full_tensor()``, which nothing else reads
        elif isinstance(slot, str):
            owner.update_kwarg(slot, obs_node)
        else:
            owner.update_arg(slot, obs_node)
        count += 1
    gm.meta["fxsparse_observed"] = count
    gm.graph.lint()
    gm.recompile()
    return gm
