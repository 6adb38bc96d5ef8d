"""Lower pass: rewrite each planned linear into an ``fxsparse`` op, or its mask as aten ops + ``linear``.

Pre: ``match_linears`` has run. ``plan`` maps module names to ``LayerPlan``s.
Post: every site with a plan entry calls ``fxsparse::threshold_linear(x, W, b, threshold, center,
channel_scale, center_bias)``, except entries whose ``method`` is ``"topk"``, which call
``fxsparse::topk_linear(x, W, b, k, center, channel_scale)`` with
``k = in_features - round(target_sparsity * in_features)`` (their ``threshold`` is unused), and
entries whose ``prefill`` is ``"dense"`` or ``"2:4"``, which call
``fxsparse::prefill_linear(x, W, b, threshold, center, channel_scale, center_bias, decode_rows,
min_rows_24)`` (threshold op up to ``decode_rows`` rows, 2:4 from ``min_rows_24`` rows, dense
between; ``min_rows_24`` is resolved here: the ``crossover_rows`` argument, else the measured
crossover on CUDA, else never). When the row count of the call is static, or its symbolic range
lies within one branch, the branch's op is emitted directly instead (``threshold_linear``, a
plain ``linear``, or ``prefill_linear`` for 2:4); otherwise the op decides per call. A
threshold entry that keeps every input (``threshold <= 0``, no negative scale: e.g. a 0% target)
is the dense layer exactly and becomes a plain ``linear``; so does, on CUDA with
``dense_when_faster``, a threshold entry whose one-row sparse GEMV measures slower than dense at
its target sparsity (``crossover.gemv_pays``: small weights).

A site that would get ``threshold_linear`` (a threshold entry, or a prefill entry whose static
branch is the threshold op) and whose every call has more rows than the fused kernel takes
(``_row_range(x)`` lowest > ``sparse_gemv.max_rows``, currently 2 for 16-bit weights planned at
50% or more, else 1: any static shape of more rows), or whose row count is dynamic from 2 up
(Dynamo specialises 0 and 1: prefill graphs, whose calls of exactly two rows are few), never
runs the kernel, or seldom: on CUDA the op would launch a separate mask kernel, then cuBLAS. It
becomes the mask as plain aten ops (the reference's float32 score ``|x - center| * scale``,
``keep = ~(score < threshold)``, ``where(keep, x, center in x's dtype or 0)``) and a plain
``linear``, so Inductor fuses the mask into the kernel that produces ``x`` (RMSNorm, SiLU*mul,
...) instead of paying a launch per call (branch ``"mask+linear"``). Sites of one sibling set
that read the same ``x`` share one mask. Eager (``inductor=False``) this is
``threshold_linear_reference`` bit for bit. Under Inductor a fused producer keeps ``x`` in
float32, so the score would be taken before ``x`` is rounded to bf16/fp16; thresholds calibrated
as quantiles of bf16 activations are often bf16 values that several entries equal exactly (kept
in eager), and about half of those would fall below (H200, RMSNorm -> 4096² bf16, 4 rows,
threshold at the 50%/90% quantile: 31 and 6 of 16384 entries flipped, output 3% and 5% from
eager). The backend therefore compiles graphs with such sites with Inductor's
``emulate_precision_casts``, which rounds fused intermediates as eager does (output then < 1e-4
from eager, no measurable cost). ``prepare_weights`` has no row counts and still makes such a
layer's weight column-major (its one-row graphs need it; cuBLAS takes either layout).

Center, scale and the folded ``center_bias = W @ center`` are buffers of ``gm`` (``get_attr``),
computed once here rather than per call. Other linears are untouched. The replacement keeps the
old node's ``meta`` (shape, stack trace, module stack).
``gm.meta["fxsparse_decisions"]`` lists, for every site, what was done and why, for inspection
(``branch``: threshold | mask+linear | dense | 2:4 | per-call);
``torch._dynamo.utils.counters["fxsparse"]`` counts lowered (mask+linear included) and dense sites.

Raises ``PlanError`` when a planned layer's weight shape differs from the plan's.
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
from ..kernels import prefill_linear, sparse_gemv, threshold_linear  # noqa: F401  (registers the ops)
from ..kernels.center_bias import center_bias_value, register_center_bias
from ..kernels.crossover import NEVER, gemv_pays, resolve_min_rows_24
from ..kernels.prefill_linear import branch
from ..kernels.topk_linear import topk_keep_count
from ..plan import LayerPlan, SparsityPlan, name_candidates
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


def _static_branch(rows: tuple[int, float] | None, decode_rows: int, min_rows_24: int) -> str | None:
    """The branch every call takes when the row range lies within one, else None."""
    if rows is None:
        return None
    lo, hi = rows
    if lo > hi:
        return None
    first = branch(lo, decode_rows, min_rows_24)
    if hi == math.inf:  # unbounded: only a branch that holds for every larger count
        return first if first == "2:4" or (first == "dense" and min_rows_24 >= NEVER) else None
    return first if branch(int(hi), decode_rows, min_rows_24) == first else None


def _mask_key(name: str, lp: LayerPlan) -> tuple | None:
    """What must match for two plan entries to share one mask and one launch: the parent
    module, the input width and every mask argument (None: never grouped). The prefill kind
    does not matter: the decode graphs of dense- or 2:4-prefill entries call the threshold op
    too, and only those calls are grouped."""
    if lp.method == "topk" or lp.drops_nothing:
        return None
    center = tuple(lp.center) if isinstance(lp.center, list) else float(lp.center)
    scale = None if lp.channel_scale is None else tuple(lp.channel_scale)
    return name.rpartition(".")[0], lp.in_features, float(lp.threshold), center, scale


def sibling_sets(plan: SparsityPlan) -> dict[str, tuple[str, ...]]:
    """For every plan entry, the entries it may be grouped with (itself included): sibling
    projections of one module calibrated on the same input to the same mask, such as q/k/v
    or gate/up. Decided on the plan alone, so ``prepare_weights`` and this pass agree."""
    by_key: dict[tuple, list[str]] = {}
    out: dict[str, tuple[str, ...]] = {}
    for name, lp in plan.layers.items():
        key = _mask_key(name, lp)
        if key is None:
            out[name] = (name,)
        else:
            by_key.setdefault(key, []).append(name)
    for names in by_key.values():
        out.update(dict.fromkeys(names, tuple(names)))
    return out


def dense_reason(lp: LayerPlan, dtype: torch.dtype | None, device: torch.device,
                 dense_when_faster: bool = True, out_features: int | None = None) -> str | None:
    """Why a plan entry runs dense at every row count, or None. One rule for this pass and
    ``prepare_weights``, so a layer lowered dense keeps its row-major weight: an entry that drops
    nothing, or (``dense_when_faster``, weight dtype known) a threshold entry whose one-row sparse
    GEMV measures slower than dense at its target sparsity (``crossover.gemv_pays``).
    ``out_features``: the width the kernel runs at, the sibling set's total when the entry is
    grouped (k/v_proj alone lose to cuBLAS, but ride along with q_proj in one launch)."""
    if lp.drops_nothing:
        return "threshold <= 0 drops nothing: dense is exact"
    if not dense_when_faster or dtype is None or lp.prefill != "threshold" or lp.method == "topk":
        return None
    n = out_features or lp.out_features
    pays, times = gemv_pays(n, lp.in_features, dtype, device, lp.target_sparsity)
    if pays:
        return None
    return (f"sparse GEMV slower than dense here: {times[1]:.1f} vs {times[0]:.1f} us "
            f"at sparsity {lp.target_sparsity:.2f}, N = {n} (dense_when_faster)")


def _above_kernel_rows(x: object, lp: LayerPlan, w_dtype: torch.dtype | None) -> str | None:
    """Why the calls of this threshold site are left to mask + linear (the op would run a mask
    kernel, then cuBLAS), or None: every call has more rows than ``sparse_gemv.max_rows``, or
    the row count is dynamic from 2 up (Dynamo specialises 0 and 1), whose calls are prefill's
    and whose few calls of exactly two rows lose less than a mask launch on every other call."""
    rows = _row_range(x)
    if rows is None:
        return None
    limit = sparse_gemv.max_rows(lp.out_features, lp.in_features, w_dtype or _traced_value(x).dtype,
                                 lp.target_sparsity)
    if rows[0] > limit:
        return (f"every call has >= {rows[0]} rows (above the fused kernel's limit of {limit}): "
                "mask left to Inductor to fuse into x's producer")
    if rows[0] > 1 and rows[1] > limit:
        return (f"calls have {rows[0]} to {rows[1]} rows (mostly above the fused kernel's limit of "
                f"{limit}): mask left to Inductor to fuse into x's producer")
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


def group_width(plan: SparsityPlan, name: str, sets: dict[str, tuple[str, ...]] | None = None,
                grouped: bool = True) -> int:
    """Output features the kernel runs at for entry ``name``: its sibling set's total."""
    members = (sets or sibling_sets(plan))[name] if grouped else (name,)
    return sum(plan.layers[m].out_features for m in members)


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
        tp = None
        if shard is not None:
            reason = shard.reason or (sharding.unsliceable_reason(lp, shard.layout) if shard.layout else None)
            if reason is not None:  # left as it is: DTensor (or the engine) runs it dense
                decisions.append({"name": site.name, "plan_key": key, "node": node.name, "op": "linear",
                                  "reason": f"tensor parallel: {reason}", "branch": "dense"})
                counters["fxsparse"]["dense"] += 1
                continue
            layout = shard.layout
            lp = sharding.local_plan(key, lp, layout)
            tp = f"{layout.kind} [{layout.lo}, {layout.hi}) of {layout.world}"
            with graph.inserting_before(node):
                x, w, b = shard.local_operands(graph, x, w, b)
            w_val = w_val.to_local()
        device = w_val.device if w_val is not None else torch.device("cpu")
        sparse_gemv.reserve(device)  # the kernel's persistent state, outside CUDA-graph pools

        # -- prefill dispatch: which rows run what, decided here when the row count allows --
        what = "threshold"  # the branch emitted: threshold | mask+linear | dense | 2:4 | per-call
        min_rows_24 = None
        width = group_width(plan, key, sets, grouped)
        if shard is not None and shard.layout.kind == "colwise":  # the rank's rows of each member
            width = sum(sharding.local_features(plan.layers[m].out_features, shard.layout)
                        for m in (sets[key] if grouped else (key,)))
        reason = dense_reason(lp, None if w_val is None else w_val.dtype, device, dense_when_faster, width)
        if reason is not None:
            what = "dense"
        elif lp.prefill != "threshold":
            min_rows_24 = NEVER
            if lp.prefill == "2:4":
                dtype = w_val.dtype if w_val is not None else torch.float32
                epilogue = b is not None or lp.center_tensor() is not None
                min_rows_24 = resolve_min_rows_24(lp.out_features, lp.in_features, dtype, device,
                                                  crossover_rows, epilogue, cudagraphs)
            what = _static_branch(_row_range(x), lp.decode_rows, min_rows_24) or "per-call"
        if what == "threshold" and lp.method != "topk":  # never the kernel: mask left to Inductor
            reason = _above_kernel_rows(x, lp, None if w_val is None else w_val.dtype)
            what = "mask+linear" if reason else what
        if device.type not in autocast:  # enter/exit nodes stay where they are as sites are lowered
            autocast[device.type] = autocast_dtypes(gm, device.type)
        cast_to = autocast[device.type].get(node)  # the linear would run (and return) in this dtype
        cast_out = None  # top-k under autocast: the op, then its output in autocast's dtype
        if cast_to is not None and what != "dense":
            if lp.method == "topk":
                cast_out = cast_to
                reason = f"under torch.autocast({device.type!r}, {cast_to}): output cast to it"
            else:
                what = "mask+linear"
                reason = (f"under torch.autocast({device.type!r}, {cast_to}): the mask in x's dtype, "
                          "then the autocast linear, as eager runs it")
        reason = reason or "planned"

        # -- constants, computed once ----------------------------------------------------------
        center = lp.center_tensor()
        scale = lp.scale_tensor()
        center_bias = None
        real_w = _real(w_val)
        plain = what in ("dense", "mask+linear")  # a plain linear, on x or on its aten mask
        if center is not None and real_w is not None and not plain:
            # kept fresh by the kernels if the weight changes in place later (kernels/center_bias.py)
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
                    k = topk_keep_count(lp.in_features, lp.target_sparsity or 0.0)
                    op = torch.ops.fxsparse.topk_linear.default
                    new = graph.call_function(op, (x, w, b, k, c_node, s_node))
                else:
                    cb_node = (None if center_bias is None
                               else _buffer(gm, graph, key + "_cbias", center_bias))
                    args = (x, w, b, float(lp.threshold), c_node, s_node, cb_node)
                    if what == "threshold":
                        op = torch.ops.fxsparse.threshold_linear.default
                    else:  # 2:4 for every call, or decided per call
                        op = torch.ops.fxsparse.prefill_linear.default
                        args = (*args, int(lp.decode_rows), int(min_rows_24))
                    new = graph.call_function(op, args)
        new.meta.update(node.meta)
        if cast_out is not None:  # the op ignores autocast
            new.meta.pop("val", None)
            with graph.inserting_after(new):
                cast = graph.call_function(torch.ops.aten._to_copy.default, (new,), {"dtype": cast_out})
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
                          "reason": reason, "prefill": lp.prefill, "decode_rows": lp.decode_rows,
                          "min_rows_24": min_rows_24, "branch": what, **({"tp": tp} if tp else {})})
        counters["fxsparse"]["dense" if what == "dense" else "lowered"] += 1

    if suspects and plan.layers:
        warnings.warn(f"sparse_act: {len(suspects)} of the graph's {len(decisions)} linears run dense "
                      f"because the plan does not fit them, e.g. {suspects[0]}", stacklevel=2)
    gm.meta["fxsparse_decisions"] = decisions
    graph.lint()
    gm.recompile()
    return gm
