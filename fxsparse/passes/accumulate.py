"""Accumulate pass: one-row sparse layers add into float32 outputs that their readers round.

Pre: ``lower_linears`` (and ``group_siblings``, ``fuse_activations``) have run. Post: every static
one-row ``threshold_linear``, ``_group`` and ``_act`` call on a device in ``devices`` whose output
does not require grad becomes ``threshold_linear_acc(acc, x, ...)`` on a float32 ``acc`` (members'
outputs side by side), and each former output is ``narrow(acc, -1, offset, N).to(dtype)``. The
``acc`` are chained: the first per device is one ``torch.zeros``; every call returns the zeros the
next one needs (on CUDA written by the same launch). An input that is such a rounded output read
only by sparse layers (down reading gate/up) is passed as the float32 sum; the op rounds it.

Why: the CUDA kernel then adds each K-split's partial with relaxed atomics and is done, with no
last-split fence, count, reload and store (~1.2-2.2 µs per call on an H200 at 50%,
``bench/results/gemv_accum_h200.md``); the rounding moves into the reader, which Inductor fuses.
The order of float32 additions varies run to run, so the backend skips this pass under
``torch.use_deterministic_algorithms``. Converted sites' decisions gain ``accumulate: True``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch import fx
from torch._dynamo.utils import counters

from ..kernels import threshold_linear  # noqa: F401  (registers the ops)
from .lower import _row_range, _traced_value

__all__ = ["accumulate_outputs"]

_OPS = torch.ops.fxsparse


def _operands(node: fx.Node) -> tuple | None:
    """``(x, x_mul, weights, biases, threshold, center, scale, center_biases, act, weight_scales)``
    of a call this pass converts (``weight_scales``: None, or one per 8-bit weight), None for
    anything else."""
    if node.op != "call_function" or node.kwargs:
        return None
    t, a = node.target, node.args
    one = lambda v: [v] if v is not None else []  # noqa: E731
    if t is _OPS.threshold_linear.default and len(a) in (7, 8):
        x, w, b, thr, c, s, cb, sc = (*a, None)[:8]
        return x, None, [w], one(b), thr, c, s, one(cb), None, None if sc is None else [sc]
    if t is _OPS.threshold_linear_group.default and len(a) in (7, 8):
        x, ws, bs, thr, c, s, cbs, scs = (*a, None)[:8]
        return x, None, list(ws), list(bs), thr, c, s, list(cbs), None, None if scs is None else list(scs)
    if t is _OPS.threshold_linear_act.default and len(a) in (9, 10):
        x, xm, w, b, thr, c, s, cb, act, sc = (*a, None)[:10]
        return x, xm, [w], one(b), thr, c, s, one(cb), act, None if sc is None else [sc]
    return None


def _outputs(node: fx.Node) -> list[tuple[fx.Node, torch.Tensor]] | None:
    """The nodes that carry the call's outputs, with their traced values, in member order."""
    if node.target is _OPS.threshold_linear_group.default:
        items = sorted(node.users, key=lambda u: u.args[1] if u.target is operator.getitem else -1)
        if any(u.target is not operator.getitem for u in items) or [u.args[1] for u in items] != list(
                range(len(node.args[1]))):
            return None  # the list is used as a whole, or a member is unused: leave it
        vals = [_traced_value(u) for u in items]
        return None if any(v is None for v in vals) else list(zip(items, vals, strict=True))
    val = _traced_value(node)
    return None if val is None else [(node, val)]


def _reads_as_input(user: fx.Node, y: fx.Node, dtype: torch.dtype) -> bool:
    """Whether ``user`` is an accumulating call that reads ``y`` as x or x_mul only, of layers
    of ``dtype`` (so it rounds a float32 x to what ``y`` holds): 16-bit weights of that dtype,
    or 8-bit weights whose call names it."""
    if user.target is not _OPS.threshold_linear_acc.default:
        return False
    a = user.args
    if len(a) > 12 and a[11] is not None:  # 8-bit weights: the call's dtype argument
        layer = a[12]
    else:
        w = _traced_value(a[3][0])
        layer = None if w is None else w.dtype
    return layer == dtype and y in (a[1], a[2]) and not any(
        y is v or (isinstance(v, list | tuple) and y in v) for v in (a[0], *a[3:]))


def accumulate_outputs(gm: fx.GraphModule, devices: Iterable[str] = ("cuda",)) -> fx.GraphModule:
    """Chain the graph's one-row sparse layers through float32 accumulators (module docstring)."""
    graph = gm.graph
    devices = set(devices)
    sites = []
    for node in graph.nodes:
        ops = _operands(node)
        if ops is None or _row_range(ops[0]) != (1, 1):
            continue
        outs = _outputs(node)
        weights = [_traced_value(w) for w in ops[2]]
        if outs is None or any(w is None for w in weights):
            continue
        # the layers' dtype: 16-bit weights', or with 8-bit weights their outputs'
        wdtype = weights[0].dtype if ops[9] is None else outs[0][1].dtype
        if any(v.requires_grad or v.device.type not in devices or v.dtype != wdtype for _, v in outs):
            continue
        shape = (*outs[0][1].shape[:-1], sum(v.shape[-1] for _, v in outs))
        sites.append((node, outs, shape, outs[0][1].device))
    if not sites:
        return gm

    rounded: dict[fx.Node, tuple[fx.Node, torch.dtype]] = {}  # ``to`` node -> (float32 slice, dtype)
    renamed: dict[str, str] = {}
    acc = None
    for i, (node, outs, shape, device) in enumerate(sites):
        x, xm, ws, bs, thr, c, s, cbs, act, scs = _operands(node)  # earlier sites' outputs replaced now
        chained = i + 1 < len(sites) and sites[i + 1][3] == device  # several GPUs: a chain per run of one
        nxt = list(sites[i + 1][2]) if chained else [0]
        with graph.inserting_before(node):
            if acc is None:
                acc = graph.call_function(torch.zeros, (shape,), {"dtype": torch.float32, "device": device})
            quant = () if scs is None else (scs, outs[0][1].dtype)  # 8-bit: scales, the layers' dtype
            new = graph.call_function(_OPS.threshold_linear_acc.default,
                                      (acc, x, xm, ws, bs, thr, c, s, cbs, act, nxt, *quant))
            offset = 0
            for out, val in outs:
                n = val.shape[-1]
                part = graph.call_function(torch.narrow, (acc, -1, offset, n))
                y = graph.call_method("to", (part, val.dtype))
                y.meta.update(out.meta)
                out.replace_all_uses_with(y)
                rounded[y] = (part, val.dtype)
                renamed[out.name] = new.name
                offset += n
        for out, _ in outs:
            if out is not node:
                graph.erase_node(out)
        graph.erase_node(node)
        acc = new if chained else None
        counters["fxsparse"]["accumulated"] += 1

    # a rounded output read only by sparse layers, as their input: give them the float32 sum
    for y, (part, dtype) in rounded.items():
        readers = list(y.users)
        if readers and all(_reads_as_input(u, y, dtype) for u in readers):
            for u in readers:
                u.args = tuple(part if a is y else a for a in u.args)
            graph.erase_node(y)

    for d in gm.meta.get("fxsparse_decisions", []):
        if d.get("node") in renamed:  # ``op`` stays the function it computes (act, group)
            d["node"], d["accumulate"] = renamed[d["node"]], True
    graph.lint()
    gm.recompile()
    return gm
