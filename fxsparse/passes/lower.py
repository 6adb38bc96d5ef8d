"""Lower pass: rewrite each planned linear into ``torch.ops.fxsparse.threshold_linear``.

Pre: ``match_linears`` has run. ``plan`` maps module names to ``LayerPlan``s.
Post: every site with a plan entry calls ``fxsparse::threshold_linear(x, W, b, threshold, center,
channel_scale, center_bias)``, except entries whose ``method`` is ``"topk"``, which call
``fxsparse::topk_linear(x, W, b, k, center, channel_scale)`` with
``k = in_features - round(target_sparsity * in_features)`` (their ``threshold`` is unused);
center, scale and the folded ``center_bias = W @ center`` are
buffers of ``gm`` (``get_attr``), computed once here rather than per call. Other linears are
untouched. The replacement keeps the old node's ``meta`` (shape, stack trace, module stack).
``gm.meta["fxsparse_decisions"]`` lists, for every site, what was done and why, for inspection;
``torch._dynamo.utils.counters["fxsparse"]`` counts lowered and dense sites.

Raises ``PlanError`` when a planned layer's weight shape differs from the plan's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch._dynamo.utils import counters

from ..kernels import sparse_gemv, threshold_linear  # noqa: F401  (registers torch.ops.fxsparse)
from ..kernels.topk_linear import topk_keep_count
from ..plan import PlanError, SparsityPlan
from .match import linear_args, linear_sites

__all__ = ["lower_linears"]


def _real(t: object) -> torch.Tensor | None:
    """A real (not fake/meta) tensor, or None."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type != "meta":
        return t
    return None


def _weight_value(index: int | None, w: object, example_inputs: Sequence[object] | None):
    """The weight's real value (the placeholder's example input), else its traced fake value."""
    value = None
    if index is not None and example_inputs is not None:
        value = _real(example_inputs[index])
    if value is None and isinstance(w, fx.Node):
        value = w.meta.get("val")
    return value


def _buffer(gm: fx.GraphModule, graph: fx.Graph, stem: str, value: torch.Tensor) -> fx.Node:
    name = "fxsparse_" + re.sub(r"\W", "_", stem)
    i = 0
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    gm.register_buffer(f"{name}_{i}", value)
    # Dynamo graphs map every lifted parameter/buffer to its source; AOTAutograd looks new
    # buffers up there too, so a constant of ours needs an entry (else Inductor asserts).
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[f"{name}_{i}"] = ConstantSource(f"{name}_{i}")
    node = graph.get_attr(f"{name}_{i}")
    node.meta["val"] = value
    return node


def lower_linears(
    gm: fx.GraphModule,
    plan: SparsityPlan,
    example_inputs: Sequence[object] | None = None,
) -> fx.GraphModule:
    """Replace planned linears by the threshold op (see module docstring)."""
    graph = gm.graph
    decisions = []
    for node, site in linear_sites(gm):
        key = plan.resolve(site.name)
        if key is None:
            decisions.append({"name": site.name, "node": node.name, "op": "linear",
                              "reason": plan.skip_reason(site.name)})
            counters["fxsparse"]["dense"] += 1
            continue
        lp = plan.layers[key]
        if lp.prefill != "threshold":  # reserved in the plan format, not lowered yet
            raise PlanError(f"layer {key!r}: prefill={lp.prefill!r} is not implemented yet; "
                            "only 'threshold' (the same op at every row count) is")

        # -- operands: input, weight, bias as nodes; the weight's value if we have it ----------
        if site.kind == "call_module":
            mod = gm.get_submodule(node.target)
            x = node.args[0]
            with graph.inserting_before(node):
                w = graph.get_attr(f"{node.target}.weight")
                b = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            w_val = mod.weight
        elif site.kind == "conv1d":  # addmm(b, x, W_in_out): the linear's weight is W.t()
            b, x, w_in_out = node.args[:3]
            with graph.inserting_before(node):
                w = graph.call_method("t", (w_in_out,))
            w_val = _weight_value(site.weight_index, w_in_out, example_inputs)
            w_val = None if w_val is None else w_val.t()
            if w_val is not None:
                w.meta["val"] = w_val
        else:
            x, w, b = linear_args(node)
            w_val = _weight_value(site.weight_index, w, example_inputs)
        if w_val is not None:
            plan.check_shape(key, tuple(w_val.shape))
        device = w_val.device if w_val is not None else torch.device("cpu")
        sparse_gemv.reserve(device)  # the kernel's persistent state, outside CUDA-graph pools

        # -- constants, computed once ----------------------------------------------------------
        center = lp.center_tensor()
        scale = lp.scale_tensor()
        center_bias = None
        real_w = _real(w_val)
        if center is not None and real_w is not None:
            with torch.no_grad():
                c = center.to(device=device, dtype=real_w.dtype).expand(real_w.shape[1])
                center_bias = F.linear(c, real_w).float()
        with graph.inserting_before(node):
            c_node = _buffer(gm, graph, key + "_center", center.to(device)) if center is not None else None
            s_node = _buffer(gm, graph, key + "_scale", scale.to(device)) if scale is not None else None
            if lp.method == "topk":
                k = topk_keep_count(lp.in_features, lp.target_sparsity or 0.0)
                op = torch.ops.fxsparse.topk_linear.default
                new = graph.call_function(op, (x, w, b, k, c_node, s_node))
            else:
                cb_node = _buffer(gm, graph, key + "_cbias", center_bias) if center_bias is not None else None
                op = torch.ops.fxsparse.threshold_linear.default
                new = graph.call_function(op, (x, w, b, float(lp.threshold), c_node, s_node, cb_node))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        decisions.append({"name": site.name, "plan_key": key, "node": new.name,
                          "op": "fxsparse." + op._schema.name.split("::")[1], "reason": "planned"})
        counters["fxsparse"]["lowered"] += 1

    gm.meta["fxsparse_decisions"] = decisions
    graph.lint()
    gm.recompile()
    return gm
