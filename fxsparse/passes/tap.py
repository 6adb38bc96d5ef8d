"""Tap pass (debugging): record the input each sparse site judges, to compare with eager.

Pre: the lower pass and any later passes have run; ``gm.meta["fxsparse_decisions"]`` names each
site's final node. Post: the input each site masks goes through ``fxsparse::keep_tap`` first
(recorded under the site's plan key; one tap per sibling set): the x of the ``fxsparse`` ops
(``a`` and ``b`` of a fused activation, the float32 sum of an accumulated input, rounded as the
kernel rounds them), and the x of a ``mask+linear`` site's aten mask. The tap returns a copy, so
the site computes what it would without it, except that a ``mask+linear`` site's x is then
materialised in its dtype rather than fused into its producer: its keep decisions are those of
``emulate_precision_casts``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..kernels import tap  # noqa: F401  (registers the op)
from .lower import _traced_value

__all__ = ["tap_inputs"]

_OPS = torch.ops.fxsparse
_X_ONLY = {_OPS.threshold_linear.default, _OPS.threshold_linear_group.default,
           _OPS.prefill_linear.default, _OPS.topk_linear.default}


def _tap(graph: fx.Graph, before: fx.Node, x: fx.Node, x_mul, act: str, dtype, name: str) -> fx.Node:
    with graph.inserting_before(before):
        t = graph.call_function(_OPS.keep_tap.default, (x, x_mul, act, dtype, name))
    val = _traced_value(x)
    if val is not None:
        t.meta["val"] = val
    return t


def tap_inputs(gm: fx.GraphModule) -> fx.GraphModule:
    """Insert ``keep_tap`` before every sparse site's mask (module docstring)."""
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}  # the original nodes' order; taps go between
    done: set[fx.Node] = set()
    for d in gm.meta.get("fxsparse_decisions", []):
        if d["op"] == "linear" or "node" not in d:
            continue
        node = by_name.get(d["node"])
        if node is None:
            continue
        if node.target is operator.getitem:  # a grouped member: its group call
            node = node.args[0]
        if node in done:
            continue
        done.add(node)
        name = d.get("plan_key", d["name"])
        if d["op"] == "mask+linear":  # linear(where(keep, x, fill), W, b): tap the where's x
            x = node.args[0].args[1]
            if x.op == "call_function" and x.target is _OPS.keep_tap.default:
                continue  # a sibling's shared mask, tapped already
            chain = [u for u in x.users if u.meta.get("fxsparse_mask")]
            t = _tap(graph, min(chain, key=order.__getitem__), x, None, "", None, name)
            for u in chain:
                u.replace_input_with(x, t)
            continue
        if node.target in _X_ONLY:
            node.replace_input_with(node.args[0], _tap(graph, node, node.args[0], None, "", None, name))
        elif node.target is _OPS.threshold_linear_act.default:  # (a, b, W, ..., act)
            a, b, act = node.args[0], node.args[1], node.args[8]
            node.update_arg(0, _tap(graph, node, a, b, act, None, name))
        elif node.target is _OPS.threshold_linear_acc.default:  # (acc, x, x_mul, Ws, ..., act, zeros)
            x, xm, act = node.args[1], node.args[2], node.args[9]
            w = _traced_value(node.args[3][0])
            dtype = w.dtype if w is not None else None
            node.update_arg(1, _tap(graph, node, x, xm, act or "", dtype, name))
    graph.lint()
    gm.recompile()
    return gm
