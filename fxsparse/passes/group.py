"""Group pass: sibling projections that read the same input share one mask and one launch.

Pre: ``lower_linears`` has run with the same ``plan``. Post: ``fxsparse::threshold_linear``
calls that read the same ``x`` node (seen through identity observers, as ``explain`` inserts),
belong to one sibling set of the plan (``dispatch.sibling_sets``: same parent module, in_features
and mask arguments, e.g. q/k/v or gate/up calibrated on the same input) and agree on having a
bias and a center bias are replaced, up to ``MAX_MEMBERS`` at a time in graph order, by one
``fxsparse::threshold_linear_group(x, [W...], [b...], threshold, center, channel_scale, [cb...])``
and a ``getitem`` per member (8-bit members, which must all be: their ``weight_scales`` last).
The result is the same function: one mask instead of several,
and on CUDA one kernel launch, so the kernel's fixed cost is paid once per set and small
members (k/v) ride along with a large one. The members' decisions in
``gm.meta["fxsparse_decisions"]`` gain ``group`` (the member names) and the new op.
Sites the lower pass emitted as ``"mask+linear"`` (every call above the kernel's row limit) are
no ``threshold_linear`` calls and stay as they are: siblings there already share one mask.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx
from torch._dynamo.utils import counters

from ..dispatch import sibling_sets
from ..kernels import threshold_linear  # noqa: F401  (registers the ops)
from ..kernels.sparse_gemv import MAX_MEMBERS
from ..plan import SparsityPlan
from .match import SITE_KEY, mutation_epochs

__all__ = ["group_siblings"]


def _constant(a: object) -> bool:
    """Whether ``a`` is a constant of the graph: None, a placeholder or buffer, or computed
    from those only (a weight's ``.t()``), so it may move."""
    if not isinstance(a, fx.Node):
        return True
    if a.op in ("placeholder", "get_attr"):
        return True
    return a.op in ("call_function", "call_method") and all(_constant(i) for i in a.all_input_nodes)


def _hoist_before(anchor: fx.Node, operands: list) -> None:
    """Move the operand nodes defined after ``anchor`` (with their inputs) to just before it.
    Later members' weights may be ``get_attr`` nodes placed right before their own call (as the
    lower pass does for ``nn.Linear`` modules); such nodes depend on nothing after ``anchor``."""
    earlier = set()
    for n in anchor.graph.nodes:
        if n is anchor:
            break
        earlier.add(n)

    def hoist(n: fx.Node) -> None:
        if n in earlier:
            return
        for inp in n.all_input_nodes:
            hoist(inp)
        anchor.prepend(n)
        earlier.add(n)

    for a in operands:
        if isinstance(a, fx.Node):
            hoist(a)


def group_siblings(gm: fx.GraphModule, plan: SparsityPlan) -> fx.GraphModule:
    """Fuse sibling ``threshold_linear`` calls (see module docstring)."""
    graph = gm.graph
    op = torch.ops.fxsparse.threshold_linear.default
    sets = sibling_sets(plan)
    buckets: dict[tuple, list[fx.Node]] = defaultdict(list)
    epochs = mutation_epochs(gm)  # members between in-place writes only: the group reads x once
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not op or SITE_KEY not in node.meta:
            continue
        key = plan.resolve(node.meta[SITE_KEY].name)
        if key is None:
            continue
        x, _w, b, _thr, _c, _s, cb = node.args[:7]
        quantized = len(node.args) > 7 and node.args[7] is not None  # 8-bit weights with scales
        if isinstance(x, fx.Node) and x.meta.get("fxsparse_observer"):
            x = x.args[0]  # an observer returns its input: siblings still share it
        buckets[(x, sets[key], b is None, cb is None, quantized, epochs[node])].append(node)

    renamed: dict[str, tuple[str, list[str]]] = {}
    orphans: list[fx.Node] = []  # the other members' own center/scale/center-bias buffers
    for (x, _set, no_bias, no_cb, quantized, _epoch), nodes in buckets.items():
        for i in range(0, len(nodes), MAX_MEMBERS):
            members = nodes[i:i + MAX_MEMBERS]
            if len(members) < 2:
                continue
            names = [m.meta[SITE_KEY].name for m in members]
            first = members[0]
            _, _, _, thr, c, s, _ = first.args[:7]
            weights = [m.args[1] for m in members]
            biases = [] if no_bias else [m.args[2] for m in members]
            cbs = [] if no_cb else [m.args[6] for m in members]
            scales = [m.args[7] for m in members] if quantized else []
            dtypes = {getattr(m.args[1], "meta", {}).get("val", torch.empty(0)).dtype for m in members}
            if len(dtypes) > 1 or not all(_constant(a) for a in [*weights, *biases, *cbs, *scales]):
                continue  # an operand computed from activations, or int8 beside fp8: leave them
            _hoist_before(first, [*weights, *biases, *cbs, *scales])
            args = (x, weights, biases, thr, c, s, cbs) + ((scales,) if quantized else ())
            with graph.inserting_before(first):
                new = graph.call_function(torch.ops.fxsparse.threshold_linear_group.default, args)
                new.meta["val"] = [m.meta.get("val") for m in members]
                for j, m in enumerate(members):
                    item = graph.call_function(operator.getitem, (new, j))
                    item.meta.update(m.meta)
                    m.replace_all_uses_with(item)
                    renamed[m.name] = (item.name, names)
            for m in members:
                orphans += [a for a in m.args if isinstance(a, fx.Node) and a.op == "get_attr"]
                graph.erase_node(m)
            counters["fxsparse"]["grouped"] += len(members)

    for d in gm.meta.get("fxsparse_decisions", []):
        if d.get("node") in renamed:
            d["node"], d["group"] = renamed[d["node"]]
            d["op"] = "fxsparse.threshold_linear_group"
    for a in dict.fromkeys(orphans):
        if not a.users:
            graph.erase_node(a)
    graph.lint()
    gm.recompile()
    return gm
