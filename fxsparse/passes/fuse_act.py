"""Activation pass: a sparse layer whose input is ``act(a) * b`` computes that input itself.

Pre: ``lower_linears`` (and ``group_siblings``) have run. Post: every
``fxsparse::threshold_linear(x, W, ...)`` call of a static row count the fused kernel takes
(``sparse_gemv.max_rows``: one, or two for 16-bit weights) whose input ``x`` is ``act(a) * b`` or
``b * act(a)`` (Llama/Mistral/Qwen2's ``silu(gate) * up``, Gemma's tanh-GELU, Phi-3's
``up * silu(gate)``) or ``act(a)`` alone (OPT's ``relu(fc1)``), where ``act`` is ``silu``, ``gelu``
(exact or tanh) or ``relu`` and nothing else reads ``act(a)`` or ``x`` (observers aside), becomes
``fxsparse::threshold_linear_act(a, b, W, ..., act)``. The function is the same; on CUDA the
one-row kernel computes ``x`` while it loads it, so the kernel that wrote ``x`` (one per
layer, ~1.5 µs with its launch gap on an H200) is gone. Graphs with more rows keep ``x``: there
the mask is fused into ``x``'s producer by Inductor (``"mask+linear"``), which is better.
Traced values that require grad are left alone (the op has no autograd formula). The
decision of each fused site gains ``prologue`` (e.g. ``"silu(a) * b"``) and the new op.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch._dynamo.utils import counters

from ..kernels import sparse_gemv, threshold_linear  # noqa: F401  (registers the ops)
from .lower import _row_range, _traced_value
from .match import mutation_epochs

__all__ = ["fuse_activations"]

_MULS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def _activation(node: object) -> tuple[str, fx.Node] | None:
    """``(name, argument)`` when ``node`` computes one of ``ACTIVATIONS`` of one tensor."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.args) != 1:
        return None
    (a,) = node.args
    kw = dict(node.kwargs)
    if kw.pop("inplace", False) or not isinstance(a, fx.Node):
        return None
    t = node.target
    if t in (F.silu, torch.ops.aten.silu.default) and not kw:
        return "silu", a
    if t in (F.relu, torch.relu, torch.ops.aten.relu.default) and not kw:
        return "relu", a
    if t in (F.gelu, torch._C._nn.gelu, torch.ops.aten.gelu.default) and set(kw) <= {"approximate"}:
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(kw.get("approximate", "none"))
        return (name, a) if name else None
    return None


def _only_for(node: fx.Node, user: fx.Node) -> bool:
    """Whether every user of ``node`` is ``user`` or an observer (which measures, nothing more)."""
    return all(u is user or u.meta.get("fxsparse_observer") for u in node.users)


def _prologue(x: fx.Node, op_node: fx.Node) -> tuple[str, fx.Node, fx.Node | None, list[fx.Node]] | None:
    """``(act, a, b, nodes it replaces)`` when ``x`` is ``act(a) [* b]`` read by ``op_node`` only."""
    if not _only_for(x, op_node):
        return None
    found = _activation(x)
    if found is not None:
        return found[0], found[1], None, [x]
    if x.op != "call_function" or x.target not in _MULS or len(x.args) != 2 or x.kwargs:
        return None
    for act_node, b in (x.args, x.args[::-1]):
        found = _activation(act_node)
        if found is None or not isinstance(b, fx.Node) or not _only_for(act_node, x):
            continue
        av, bv = _traced_value(found[1]), _traced_value(b)
        if av is None or bv is None or av.shape != bv.shape or av.dtype != bv.dtype:
            continue  # a broadcasting product: not this op
        return found[0], found[1], b, [x, act_node]
    return None


def _kernel_rows(x: fx.Node, node: fx.Node) -> bool:
    """Whether every call of ``node`` has one row, or a static count the fused kernel takes."""
    rows, xv, out = _row_range(x), _traced_value(x), _traced_value(node)
    if rows is None or rows[0] != rows[1] or rows[0] < 1:
        return False
    if rows[0] == 1:
        return True
    return (xv is not None and out is not None
            and rows[0] <= sparse_gemv.max_rows(out.shape[-1], xv.shape[-1], xv.dtype))


def fuse_activations(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold ``act(a) [* b]`` into the sparse layer that reads it (see module docstring)."""
    graph = gm.graph
    op = torch.ops.fxsparse.threshold_linear.default
    renamed: dict[str, tuple[str, str]] = {}
    epochs = mutation_epochs(gm)  # act(a) * b recomputed at the layer: no in-place write between
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not op:
            continue
        x = node.args[0]
        if isinstance(x, fx.Node) and x.meta.get("fxsparse_observer"):
            x = x.args[0]  # explain's observer still measures x, which then stays for it alone
        if not isinstance(x, fx.Node) or not _kernel_rows(x, node):
            continue
        out = _traced_value(node)
        found = _prologue(x, node)
        if found is None or out is None or out.requires_grad:
            continue
        act, a, b, replaced = found
        if any(epochs[r] != epochs[node] for r in replaced):
            continue
        _, w, bias, thr, c, s, cb, *scale = node.args  # scale: an 8-bit weight's weight_scale
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.fxsparse.threshold_linear_act.default,
                                      (a, b, w, bias, thr, c, s, cb, act, *scale))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for r in replaced:  # x first, then act(a): each once nothing reads it any more
            if not r.users:
                graph.erase_node(r)
        renamed[node.name] = (new.name, f"{act}(a) * b" if b is not None else f"{act}(a)")
        counters["fxsparse"]["act_fused"] += 1

    for d in gm.meta.get("fxsparse_decisions", []):
        if d.get("node") in renamed:
            d["node"], d["prologue"] = renamed[d["node"]]
            d["op"] = "fxsparse.threshold_linear_act"
    graph.lint()
    gm.recompile()
    return gm
