"""Lower pass: rewrite each planned linear into an ``fxsparse`` op, or its mask as aten ops + ``linear``.

Pre: ``match_linears`` has run. ``plan`` maps module names to ``LayerPlan``s.
Post: every planned site runs what ``dispatch.decide`` chose for it: ``threshold_linear`` (the
fused mask + sparse GEMV), ``topk_linear`` (top-k entries), ``prefill_linear`` (2:4, or a
per-call choice when the row count is not known), a plain ``linear`` (dense), or the mask as
plain aten ops before a plain ``linear`` (``mask+linear``: calls above the kernel's row limit),
which Inductor fuses into the kernel producing ``x``. The aten mask is
``threshold_linear_reference``'s bit for bit: float32 score ``|x - center| * scale``,
``keep = ~(score < threshold)``, ``where(keep, x, fill)``; siblings reading the same ``x`` share it.

Center, scale and the folded ``center_bias = W @ center`` are buffers of ``gm`` (``get_attr``),
computed once here rather than per call. Replacements keep the old node's ``meta``.
``gm.meta["fxsparse_decisions"]`` lists, for every site, what was done and why (for ``explain``);
``torch._dynamo.utils.counters["fxsparse"]`` counts lowered and dense sites.
Tensor-parallel sites (``sharding.py``) run this rank's piece of their entry on the local tensors,
wrapped back by ``DTensor.from_local`` so the engine's all-reduce stays. 8-bit torchao weights
(``quantized.py``) give the op their data and scales as ``getattr`` graph values; plain-linear
branches call ``linear`` on the torchao tensor (its own path). ``docs/distributed.md`` and
``docs/quantized.md`` say what runs where.

Raises ``PlanError`` when a planned layer's weight shape differs from the plan's, or when a
row-parallel layer's per-channel vectors cannot be split evenly over the ranks.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import torch
from torch import fx
from torch._dynamo.utils import counters

from .. import sharding
from ..dispatch import SiteFacts, decide, sibling_sets
from ..kernels import sparse_gemv
from ..kernels.center_bias import center_bias_value, register_center_bias
from ..plan import LayerPlan, SparsityPlan, name_candidates
from ..quantized import WeightFormat, is_torchao, weight_format
from .match import linear_args, linear_sites, mutation_epochs

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


def _traced_value(x: object) -> torch.Tensor | None:
    """``x``'s traced (fake) value, None if it has none."""
    if not isinstance(x, fx.Node):
        return None
    val = x.meta.get("val", x.meta.get("example_value"))  # Dynamo graphs carry example_value
    return val if isinstance(val, torch.Tensor) else None


def _row_range(x: object) -> tuple[int, float] | None:
    """``(lowest, highest)`` row count of the call (``x``'s leading dims), None if unknown."""
    val = _traced_value(x)
    if val is None or val.dim() == 0:
        return None
    rows = math.prod(val.shape[:-1])
    if isinstance(rows, int):
        return rows, rows
    try:  # a SymInt: its value range in the shape env (guards included), when it has one
        import sympy
        from torch.utils._sympy.numbers import int_oo

        node = rows.node
        vr = node.shape_env.bound_sympy(node.expr)
        unbounded = (int_oo, -int_oo, sympy.oo, -sympy.oo)
        lo = 0 if vr.lower in unbounded else int(vr.lower)
        hi = math.inf if vr.upper in unbounded else int(vr.upper)
        return lo, hi
    except Exception:  # noqa: BLE001 - no range known: decide per call
        return None


def autocast_dtypes(gm: fx.GraphModule, device_type: str) -> dict[fx.Node, torch.dtype]:
    """The nodes that run under ``torch.autocast`` for ``device_type``, with its dtype: the
    state when the graph is compiled (Dynamo guards on it), then the ``with torch.autocast``
    regions Dynamo keeps in the graph as enter/exit calls."""
    from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

    on = torch.is_autocast_enabled(device_type)
    stack = [torch.get_autocast_dtype(device_type) if on else None]
    out: dict[fx.Node, torch.dtype] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _enter_autocast:
            dev, dtype, enabled = (list(node.args) + [None, None, True])[:3]
            mine = dev == device_type
            stack.append((dtype or torch.get_autocast_dtype(device_type)) if mine and enabled
                         else (None if mine else stack[-1]))
        elif node.op == "call_function" and node.target is _exit_autocast and len(stack) > 1:
            stack.pop()
        elif stack[-1] is not None:
            out[node] = stack[-1]
    return out


def _masked_input(gm: fx.GraphModule, graph: fx.Graph, x: fx.Node, lp: LayerPlan, key: str,
                  device: torch.device, meta: dict) -> fx.Node:
    """``where(keep, x, fill)`` as plain aten ops, exactly ``threshold_linear_reference``'s mask
    (``drop_score`` in float32, NaN kept, ``fill_value``), so Inductor can fuse it into the
    kernel producing ``x``. x's traced dtype is the one it runs with (Dynamo guards on it).
    The new nodes take the linear's stack trace and module stack from ``meta``."""
    aten = torch.ops.aten
    dtype, f32 = _traced_value(x).dtype, torch.float32
    center, scale = lp.center_tensor(), lp.scale_tensor()

    def call(target, *args, **kwargs) -> fx.Node:
        n = graph.call_function(target, args, kwargs)
        n.meta.update({k: meta[k] for k in ("stack_trace", "nn_module_stack") if k in meta})
        n.meta["fxsparse_mask"] = True  # part of a site's mask (passes/tap.py finds its x by it)
        return n

    d = x if dtype == f32 else call(aten._to_copy.default, x, dtype=f32)
    c = None
    if center is not None:
        c = _buffer(gm, graph, key + "_center", center.to(device))  # float32, as the op's
        d = call(aten.sub.Tensor, d, c)
    d = call(aten.abs.default, d)
    if scale is not None:
        d = call(aten.mul.Tensor, d, _buffer(gm, graph, key + "_scale", scale.to(device)))
    keep = call(aten.logical_not.default, call(aten.lt.Scalar, d, float(lp.threshold)))
    if c is None:
        return call(aten.where.ScalarOther, keep, x, 0.0)
    return call(aten.where.self, keep, x, c if dtype == f32 else call(aten._to_copy.default, c, dtype=dtype))


def _quantized_operands(graph: fx.Graph, w: fx.Node, fmt: WeightFormat) -> tuple[fx.Node, fx.Node]:
    """``(qdata, scale [N])`` of the 8-bit weight node ``w`` as graph values (``getattr`` on the
    subclass; a per-tensor scale broadcast as a stride-0 view). Their ``val`` is the weight's
    traced value's (fake) data where there is one, else the real data."""
    traced = _traced_value(w)
    src = weight_format(traced) if traced is not None and is_torchao(traced) else fmt
    src = src if src.quantized else fmt
    n = fmt.qdata.shape[0]
    q = graph.call_function(getattr, (w, "qdata"))
    q.meta["val"] = src.qdata
    sc = graph.call_function(getattr, (w, "scale"))
    if fmt.scale.stride(0) == 0:  # one scale for the tensor
        sc = graph.call_method("expand", (graph.call_method("reshape", (sc, 1)), n))
    else:
        sc = graph.call_method("reshape", (sc, n))
    sc.meta["val"] = src.scale
    return q, sc


def _unreadable(fmt: WeightFormat | None, w_val: object, kind: str) -> str | None:
    """Why the sparse kernel cannot read this site's torchao weight (its own path runs), or None."""
    if fmt is None or not (isinstance(w_val, torch.Tensor) and is_torchao(w_val)):
        return None
    if fmt.kind == "unsupported":
        return fmt.reason
    return "8-bit Conv1D weights are not read" if kind == "conv1d" else None


def _unplanned_reason(plan: SparsityPlan, name: str) -> tuple[str, bool]:
    """Why a linear with no plan entry stays dense, and whether that looks like a mistake: a
    name several entries end with (a submodule compiled alone), or one the plan's model did
    not have (a plan made for another model). Ignored layers are in that model's fingerprint."""
    hits = plan.candidates(name)
    if len(hits) > 1:
        return f"matches {len(hits)} plan entries ({hits[0]}, ...): compile the model the plan names", True
    linears = (plan.model or {}).get("linears") or {}
    if linears and not name_candidates(linears, name):
        model = plan.model.get("class", "?")
        return f"not a linear of the plan's model ({model}): plan made for another model?", True
    return plan.skip_reason(name), False


def lower_linears(
    gm: fx.GraphModule,
    plan: SparsityPlan,
    example_inputs: Sequence[object] | None = None,
    crossover_rows: int | None = None,
    cudagraphs: bool = False,
    dense_when_faster: bool = True,
    grouped: bool = True,
) -> fx.GraphModule:
    """Replace planned linears by the sparse ops (see module docstring).

    ``crossover_rows``: the row count from which ``prefill="2:4"`` layers run 2:4 (overrides
    the measured crossover; the backend option of the same name). ``cudagraphs``: the graph
    runs under CUDA graphs, so the crossover is measured on GPU time alone.
    ``dense_when_faster``: lower threshold layers whose sparse GEMV loses to dense as dense.
    ``grouped``: judge that at the sibling set's width (``group_siblings`` runs next).
    """
    graph = gm.graph
    decisions = []
    sets = sibling_sets(plan)
    masks: dict[tuple, fx.Node] = {}  # (x, sibling set, mutation epoch) -> masked x
    autocast: dict[str, dict[fx.Node, torch.dtype]] = {}  # device type -> nodes under autocast
    epochs = mutation_epochs(gm)  # no mask shared across an in-place write
    suspects: list[str] = []  # linears the plan seems not to be meant for
    for node, site in linear_sites(gm):
        key = plan.resolve(site.name)
        if key is None:
            reason, suspect = _unplanned_reason(plan, site.name)
            decisions.append({"name": site.name, "node": node.name, "op": "linear", "reason": reason})
            if suspect:
                suspects.append(f"{site.name}: {reason}")
            counters["fxsparse"]["dense"] += 1
            continue
        lp = plan.layers[key]
        if lp.prefill != "threshold" and lp.method == "topk":
            lp.validate(key)  # raises PlanError: top-k layers have no prefill kinds

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
        # -- tensor parallelism: this rank's piece of the layer, from its weight's placement ------
        shard = sharding.site_sharding(x, w, w_val) if site.kind == "call_function" else None
        layout = None if shard is None else (shard.reason or shard.layout)
        lp, width, unsliceable = sharding.layer_piece(plan, key, sets[key] if grouped else (key,), layout)
        tp = None
        if shard is not None:
            if unsliceable is None:  # run on the local tensors, this rank's slice of the entry
                layout = shard.layout
                tp = f"{layout.kind} [{layout.lo}, {layout.hi}) of {layout.world}"
                with graph.inserting_before(node):
                    x, w, b = shard.local_operands(graph, x, w, b)
                w_val = w_val.to_local()
            else:  # left as it is (DTensor's or the engine's dense linear)
                shard = None
        device = w_val.device if w_val is not None else torch.device("cpu")
        sparse_gemv.reserve(device)  # the kernel's persistent state, outside CUDA-graph pools
        # an 8-bit torchao weight (the op reads its data and scales), or why torchao's path stays
        fmt = weight_format(w_val) if isinstance(w_val, torch.Tensor) else None
        quant = fmt is not None and fmt.quantized

        # -- which op: one decision from the site's facts (dispatch.py) ---------------------------
        if device.type not in autocast:  # enter/exit nodes stay where they are as sites are lowered
            autocast[device.type] = autocast_dtypes(gm, device.type)
        x_val = _traced_value(x)
        # (a torchao tensor's dtype is its activation dtype: 8-bit layers are judged as 16-bit ones)
        facts = SiteFacts(plan=lp, device=device, weight_dtype=None if w_val is None else w_val.dtype,
                          input_dtype=None if x_val is None else x_val.dtype,
                          width=width, rows=_row_range(x), has_bias=b is not None,
                          autocast=autocast[device.type].get(node), unsliceable=unsliceable,
                          weights=fmt.kind if quant else None,
                          unreadable=_unreadable(fmt, w_val, site.kind))
        dec = decide(facts, dense_when_faster=dense_when_faster, crossover_rows=crossover_rows,
                     cudagraphs=cudagraphs)
        what = dec.branch

        # -- constants, computed once ----------------------------------------------------------
        center = lp.center_tensor()
        scale = lp.scale_tensor()
        center_bias = None
        real_w = _real(w_val)
        plain = dec.plain  # a plain linear, on x or on its aten mask
        if center is not None and real_w is not None and not plain:
            # kept fresh by the kernels if the weight changes in place later (kernels/center_bias.py)
            if quant:
                center_bias = register_center_bias(
                    center_bias_value(fmt.qdata, center, fmt.scale, fmt.dtype), fmt.qdata, fmt.scale)
            else:
                center_bias = register_center_bias(center_bias_value(real_w, center), real_w)
        with graph.inserting_before(node):
            if plain:
                op = torch._C._nn.linear
                xm = x
                if what == "mask+linear":  # siblings on the same x share one mask
                    mkey = (x, sets[key], epochs[node])
                    xm = masks.get(mkey)
                    if xm is None:
                        xm = masks[mkey] = _masked_input(gm, graph, x, lp, key, device, node.meta)
                new = graph.call_function(op, (xm, w, b))
            else:
                c_node = None if center is None else _buffer(gm, graph, key + "_center", center.to(device))
                s_node = None if scale is None else _buffer(gm, graph, key + "_scale", scale.to(device))
                if lp.method == "topk":
                    op = torch.ops.fxsparse.topk_linear.default
                    new = graph.call_function(op, (x, w, b, dec.topk_k, c_node, s_node))
                else:
                    cb_node = (None if center_bias is None
                               else _buffer(gm, graph, key + "_cbias", center_bias))
                    args = (x, w, b, float(lp.threshold), c_node, s_node, cb_node)
                    if quant:  # the 8-bit data and its scales, weight_scale last
                        q_node, sc_node = _quantized_operands(graph, w, fmt)
                        args = (x, q_node, b, float(lp.threshold), c_node, s_node, cb_node, sc_node)
                    if what == "threshold":
                        op = torch.ops.fxsparse.threshold_linear.default
                    else:  # 2:4 for every call, or decided per call
                        op = torch.ops.fxsparse.prefill_linear.default
                        args = (*args, int(lp.decode_rows), int(dec.min_rows_24))
                    new = graph.call_function(op, args)
        new.meta.update(node.meta)
        if dec.cast_out is not None:  # the op ignores autocast
            new.meta.pop("val", None)
            with graph.inserting_after(new):
                cast = graph.call_function(torch.ops.aten._to_copy.default, (new,), {"dtype": dec.cast_out})
            cast.meta.update(node.meta)
            new = cast
        op_node = new
        if shard is not None:  # a DTensor call: the local result back in DTensor's placement
            new = shard.wrap_output(graph, new, node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if shard is not None:
            shard.erase_unused_input(graph)
        op_name = {"dense": "linear", "mask+linear": "mask+linear"}.get(what) or \
            "fxsparse." + op._schema.name.split("::")[1]
        decisions.append({"name": site.name, "plan_key": key, "node": op_node.name, "op": op_name,
                          "reason": dec.reason, "prefill": lp.prefill, "decode_rows": lp.decode_rows,
                          "min_rows_24": dec.min_rows_24, "branch": what, **({"tp": tp} if tp else {}),
                          "weights": None if fmt is None else fmt.kind})
        counters["fxsparse"]["dense" if what == "dense" else "lowered"] += 1

    if suspects and plan.layers:
        warnings.warn(f"sparse_act: {len(suspects)} of the graph's {len(decisions)} linears run dense "
                      f"because the plan does not fit them, e.g. {suspects[0]}", stacklevel=2)
    gm.meta["fxsparse_decisions"] = decisions
    graph.lint()
    gm.recompile()
    return gm
