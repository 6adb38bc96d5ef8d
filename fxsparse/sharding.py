"""Tensor parallelism: which part of a planned linear this rank holds, read from its weight's DTensor.

fxsparse does no sharding of its own. A model made tensor-parallel by PyTorch
(``torch.distributed.tensor.parallel.parallelize_module`` with ``ColwiseParallel`` /
``RowwiseParallel``) or by transformers (``from_pretrained(..., tp_plan="auto")``) holds each
sharded weight as a ``DTensor``; its placement says what this rank computes:

* ``Shard(0)`` (column-parallel: q/k/v, gate/up): rows ``[lo, hi)`` of W, the full input. The
  mask is the full input's mask, as on one device; only ``out_features`` shrinks.
* ``Shard(1)`` (row-parallel: o_proj, down_proj): columns ``[lo, hi)`` of W and the matching
  slice of the input. The mask of that slice uses the same slice of a per-channel ``center`` /
  ``channel_scale``; the output is a partial sum that the engine's all-reduce completes, so
  ``W @ center`` folds in per rank (its slice) and a bias is added on one rank only.
* ``Replicate()`` everywhere: the whole layer on every rank, as on one device.

Anything else (several sharded mesh dimensions, strided or partial weights, a shard that is not
the ``torch.chunk`` split) is not sliced: the layer runs dense, with the reason.

A compiled graph meets these layers in one of two forms, both handled here:

* ``F.linear`` on DTensors (``parallelize_module``): the sparse op runs on the local tensors
  (``to_local`` of the weight; the input's local tensor, taken from the engine's ``from_local``)
  and its result is wrapped back with ``DTensor.from_local`` in the placement DTensor gave the
  linear, so the engine's ``redistribute`` (the all-reduce of a row-parallel layer) stays
  where it was. A column-parallel output that the engine only unwraps again
  (``redistribute`` to the same placement, then ``to_local``) is used directly.
* ``F.linear`` on local tensors whose weight is ``to_local()`` of a DTensor parameter
  (transformers' inference path, which all-reduces row-parallel outputs itself).

The plan is always the unsharded model's; ``local_plan`` cuts the rank's part from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from .dispatch import group_width
from .plan import LayerPlan, PlanError

__all__ = ["Layout", "SiteSharding", "gather_channels", "is_dtensor", "is_tensor_parallel", "layer_piece",
           "local_plan", "local_tensor", "local_width", "make_column_major", "make_row_major",
           "same_on_every_rank", "site_sharding", "unsliceable_reason", "weight_layout", "writes_files"]


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (fake or real)."""
    if not isinstance(value, torch.Tensor) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _chunk(n: int, world: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s piece when ``n`` is split as ``torch.chunk`` (and DTensor's
    ``Shard``) splits it: pieces of ``ceil(n / world)``, the last ones shorter or empty."""
    size = -(-n // world)
    lo = min(rank * size, n)
    return lo, min(lo + size, n)


@dataclass(frozen=True)
class Layout:
    """How one linear's weight ``[out, in]`` is split over the ranks, seen from this rank.

    ``kind``: ``"colwise"`` (rows ``[lo, hi)`` of ``out``), ``"rowwise"`` (columns ``[lo, hi)``
    of ``in``) or ``"replicate"`` (all of it); ``mesh_dim`` the sharded dimension of the device
    mesh, ``rank`` this rank's coordinate along it, ``world`` its size."""

    kind: str
    lo: int
    hi: int
    rank: int = 0
    world: int = 1
    mesh_dim: int = 0
    mesh: Any = None  # the DeviceMesh

    @property
    def group(self):
        """The process group of the sharded mesh dimension (the ranks holding the pieces)."""
        return self.mesh.get_group(self.mesh_dim)


def weight_layout(weight: torch.Tensor) -> Layout | str | None:
    """The ``Layout`` of a DTensor weight ``[out, in]``; a string saying why it cannot be sliced;
    None for a plain tensor (no tensor parallelism)."""
    if not is_dtensor(weight):
        return None
    from torch.distributed.tensor import Shard

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    out_f, in_f = weight.shape
    sharded = [(d, p) for d, p in enumerate(placements) if not p.is_replicate()]
    if not sharded:
        return Layout("replicate", 0, out_f, mesh=mesh)
    if len(sharded) > 1:
        return f"weight sharded on {len(sharded)} mesh dimensions {placements}: not sliced by fxsparse"
    mesh_dim, p = sharded[0]
    if type(p) is not Shard:  # Partial, _StridedShard, ...
        return f"weight placement {p} on mesh dimension {mesh_dim}: not sliced by fxsparse"
    dim = p.dim % 2
    rank, world = mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim)
    lo, hi = _chunk(weight.shape[dim], world, rank)
    local = tuple(weight.to_local().shape)
    want = (hi - lo, in_f) if dim == 0 else (out_f, hi - lo)
    if local != want:
        return (f"local weight {local} is not this rank's torch.chunk piece {want} of {tuple(weight.shape)}: "
                "not sliced by fxsparse")
    return Layout("colwise" if dim == 0 else "rowwise", lo, hi, rank, world, mesh_dim, mesh)


def local_width(plan, members, layout: Layout) -> int:
    """Output features this rank's kernel runs at for a sibling set ``members`` (``dispatch.group_width``
    on the rank's pieces): each column-parallel member's rows, a row-parallel one's all."""
    width = 0
    for m in members:
        n = plan.layers[m].out_features
        lo, hi = _chunk(n, layout.world, layout.rank) if layout.kind == "colwise" else (0, n)
        width += hi - lo
    return width


def unsliceable_reason(lp: LayerPlan, layout: Layout) -> str | None:
    """Why a plan entry cannot run on this layout's local piece (the layer then runs dense), or None."""
    if layout.kind != "rowwise":
        return None
    if lp.method == "topk":
        return "row-parallel top-k: a rank holds part of each row, the top k are chosen over the whole row"
    if lp.prefill == "2:4" and (layout.lo % 4 or (layout.hi - layout.lo) % 4):
        return (f"row-parallel 2:4 prefill: this rank's input slice [{layout.lo}, {layout.hi}) "
                "splits groups of 4")
    return None


def local_plan(name: str, lp: LayerPlan, layout: Layout) -> LayerPlan:
    """The part of the unsharded model's entry ``lp`` this rank runs: ``out_features`` cut to
    its rows (column-parallel), or ``in_features``, ``center`` and ``channel_scale`` cut to its
    input slice (row-parallel). Raises ``PlanError`` naming the layer when a per-channel vector
    cannot be split evenly over the ranks."""
    if layout.kind == "colwise":
        return replace(lp, out_features=layout.hi - layout.lo)
    if layout.kind != "rowwise":
        return lp
    lo, hi = layout.lo, layout.hi
    per_channel = isinstance(lp.center, list) or lp.channel_scale is not None
    if per_channel and lp.in_features % layout.world:
        raise PlanError(
            f"layer {name!r}: its per-channel center/channel_scale ({lp.in_features} channels) cannot be "
            f"split evenly over {layout.world} ranks (row-parallel); use a tensor-parallel size that "
            f"divides {lp.in_features}, or leave the layer unsharded")
    center = lp.center[lo:hi] if isinstance(lp.center, list) else lp.center
    scale = None if lp.channel_scale is None else lp.channel_scale[lo:hi]
    return replace(lp, in_features=hi - lo, center=center, channel_scale=scale)


def layer_piece(plan, name: str, members, layout: Layout | str | None) -> tuple[LayerPlan, int, str | None]:
    """``(entry, width, unsliceable)``: the rank's piece of plan entry ``name`` and of its sibling
    set ``members``' width, for a weight of ``layout`` (``weight_layout``'s answer, or a site's
    reason it cannot be sliced), and why the piece cannot run the sparse op (None when it can).
    A plain weight (``layout`` None) gives the entry itself. The lower pass and
    ``prepare_weights`` both ask it, so they agree on every piece."""
    lp = plan.layers[name]
    width = group_width(plan, members)
    if layout is None:
        return lp, width, None
    if isinstance(layout, str):
        return lp, width, layout
    reason = unsliceable_reason(lp, layout)
    if reason is not None:
        return lp, width, reason
    return local_plan(name, lp, layout), local_width(plan, members, layout), None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's tensor of a DTensor, else ``t``."""
    return t.to_local() if is_dtensor(t) else t


@torch.no_grad()
def make_column_major(weight: torch.Tensor) -> None:
    """Lay a weight ``[out, in]`` out column-major in place, keeping its ``Parameter`` object:
    for a DTensor its local tensor, with the DTensor's strides to match (assigning ``.data``
    of a DTensor leaves the local tensor as it was, so the two are swapped whole)."""
    _relayout(weight, lambda t: t.t().contiguous().t(), (1, weight.shape[0]))


@torch.no_grad()
def make_row_major(weight: torch.Tensor) -> None:
    """``make_column_major``'s inverse: the weight (its local tensor) contiguous again."""
    _relayout(weight, lambda t: t.contiguous(), (weight.shape[1], 1))


def _relayout(weight: torch.Tensor, fn, global_stride: tuple[int, int]) -> None:
    if not is_dtensor(weight):
        weight.data = fn(weight.data)
        return
    from torch.distributed.tensor import DTensor

    new = DTensor.from_local(fn(weight.to_local()), weight.device_mesh, weight.placements, run_check=False,
                             shape=weight.shape, stride=global_stride)
    torch.utils.swap_tensors(weight, torch.nn.Parameter(new, requires_grad=weight.requires_grad))


# -- graph sites --------------------------------------------------------------------------------


def _value(node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val", node.meta.get("example_value"))
    return v if isinstance(v, torch.Tensor) else None


def _is_call(node: object, method: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == method


def is_from_local(node: object) -> bool:
    """Whether ``node`` calls ``DTensor.from_local`` (Dynamo records the staticmethod's function,
    whose qualified name differs across torch versions)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    from torch.distributed.tensor import DTensor

    t = node.target
    if t in (DTensor.from_local, getattr(DTensor.from_local, "__func__", None)):
        return True
    return getattr(t, "__name__", "") == "from_local" and getattr(t, "__module__", "").startswith(
        "torch.distributed.tensor")


def dtensor_source(w: object) -> fx.Node | None:
    """The DTensor placeholder a local weight is ``to_local()`` of (transformers' inference
    path swaps each sharded parameter for its local tensor during the forward), else None."""
    if _is_call(w, "to_local") and isinstance(w.args[0], fx.Node) and is_dtensor(_value(w.args[0])):
        return w.args[0]
    return None


@dataclass
class SiteSharding:
    """One linear call of a tensor-parallel model: its weight's layout, and whether the call
    runs on DTensors (``F.linear`` of DTensors, to be run on locals and wrapped back) or on
    local tensors already."""

    layout: Layout | None  # None: cannot be sliced (``reason``)
    reason: str | None
    on_dtensors: bool
    _operands: tuple = ()  # the DTensor (x, w) that ``local_operands`` replaced

    # -- rewriting a DTensor call into a local one ------------------------------------------------
    def local_operands(self, graph: fx.Graph, x: fx.Node, w: fx.Node, b: object) -> tuple:
        """``(x, w, b)`` as local tensors, nodes inserted at the graph's insertion point.
        x: the tensor the engine's ``from_local`` wrapped, else ``x.to_local()``. A row-parallel
        bias is passed on the first rank only (the outputs are summed)."""
        if not self.on_dtensors:
            return x, w, b
        self._operands = (x, w)
        x_local = local_input(graph, x)
        w_local = _to_local(graph, w)
        if b is not None and is_dtensor(_value(b)):
            b = None if self.layout.kind == "rowwise" and self.layout.rank else _to_local(graph, b)
        return x_local, w_local, b

    def erase_unused_input(self, graph: fx.Graph) -> None:
        """Drop the engine's ``from_local`` of the input once the rewritten call no longer reads it."""
        if self._operands and is_from_local(self._operands[0]) and not self._operands[0].users:
            graph.erase_node(self._operands[0])

    def wrap_output(self, graph: fx.Graph, new: fx.Node, old: fx.Node) -> fx.Node:
        """Give ``new`` (the op on local tensors, meta copied from the DTensor linear ``old``) its
        local traced value, and return what replaces ``old``: ``new`` itself for local calls and
        for a column-parallel output that the engine only unwraps (its ``to_local`` users are
        rewired to ``new``), else ``DTensor.from_local(new, mesh, placements)`` in the placement
        DTensor gave ``old``."""
        if not self.on_dtensors:
            return new
        out = _value(old)
        for key in ("example_value", "val"):
            if key in new.meta and is_dtensor(new.meta[key]):
                new.meta[key] = new.meta[key].to_local()
        placements = tuple(out.placements)
        passthrough = []
        for user in list(old.users):
            if not (_is_call(user, "redistribute") and _same_placements(user, placements, out.dim())
                    and user.users and all(_is_call(u, "to_local") and not u.kwargs for u in user.users)):
                passthrough = None
                break
            passthrough.extend(user.users)
        if passthrough and self.layout.kind in ("colwise", "replicate"):
            for r in list(old.users):  # to_local(redistribute(y, same)) is y's local tensor: the op's
                for u in list(r.users):
                    u.replace_all_uses_with(new)
                    graph.erase_node(u)
                graph.erase_node(r)
            return new
        kwargs: dict[str, Any] = {"run_check": False}
        shape = tuple(out.shape)
        if all(isinstance(s, int) for s in shape):
            kwargs["shape"], kwargs["stride"] = shape, tuple(out.stride())
        from torch.distributed.tensor import DTensor

        with graph.inserting_after(new):
            mesh = mesh_of(graph, *self._operands)
            wrapped = graph.call_function(DTensor.from_local, (new, mesh, placements), kwargs)
        wrapped.meta.update({k: v for k, v in old.meta.items() if k != "fxsparse_site"})
        return wrapped


def _normalized(placements, ndim: int) -> tuple:
    """Placements with ``Shard(-1)`` spelled ``Shard(ndim - 1)``, for comparison."""
    from torch.distributed.tensor import Shard

    return tuple(Shard(p.dim % ndim) if type(p) is Shard else p for p in placements)


def _same_placements(redistribute: fx.Node, placements: tuple, ndim: int) -> bool:
    """Whether ``y.redistribute(...)`` keeps ``y``'s mesh and ``placements`` (a no-op)."""
    args = redistribute.args  # (self, device_mesh, placements) when positional
    mesh = redistribute.kwargs.get("device_mesh", args[1] if len(args) > 1 else None)
    want = redistribute.kwargs.get("placements", args[2] if len(args) > 2 else None)
    return (want is not None and mesh is None
            and _normalized(want, ndim) == _normalized(placements, ndim))


def _to_local(graph: fx.Graph, node: fx.Node) -> fx.Node:
    out = graph.call_method("to_local", (node,))
    val = _value(node)
    if val is not None:
        out.meta["example_value"] = val.to_local()
    return out


def local_input(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """The local tensor of DTensor ``x``: the tensor the engine's ``from_local`` wrapped, else
    ``x.to_local()`` (inserted at the insertion point)."""
    if is_from_local(x):
        return x.kwargs.get("local_tensor", x.args[0] if x.args else None)
    return _to_local(graph, x)


def mesh_of(graph: fx.Graph, x: fx.Node, w: fx.Node) -> object:
    """The device mesh argument for a ``from_local`` of a linear's output: the mesh its input's
    ``from_local`` used (a graph input or a constant, whatever Dynamo made of it), else
    ``w.device_mesh``."""
    if is_from_local(x):
        mesh = x.kwargs.get("device_mesh", x.args[1] if len(x.args) > 1 else None)
        if mesh is not None:
            return mesh
    node = graph.call_function(getattr, (w, "device_mesh"))
    return node


def site_sharding(x: object, w: object, w_val: torch.Tensor | None, in_features: int | None = None
                  ) -> SiteSharding | None:
    """What tensor parallelism does to one linear call (``x``, weight node ``w``, the weight's
    value ``w_val``: the DTensor parameter), or None when the weight is a plain tensor.

    For a call on DTensors the input must be replicated (column-parallel) or sharded along its
    last dimension like the weight's columns (row-parallel), on the weight's mesh; else (and
    for an unsliceable weight) the site gets a reason and is left to DTensor, dense."""
    if not is_dtensor(w_val):
        return None
    layout = weight_layout(w_val)
    on_dtensors = is_dtensor(_value(w)) and not _is_call(w, "to_local")
    if isinstance(layout, str):
        return SiteSharding(None, layout, on_dtensors)
    xv = _value(x)
    if on_dtensors:
        reason = None
        if not is_dtensor(xv):
            reason = "a DTensor weight with a plain input: left to DTensor"
        elif xv.device_mesh != layout.mesh:
            reason = "input and weight on different device meshes: left to DTensor"
        else:
            want = {"colwise": "replicated", "replicate": "replicated", "rowwise": "sharded on its last dim"}
            for d, p in enumerate(xv.placements):
                sharded_last = p.is_shard() and p.dim % xv.dim() == xv.dim() - 1
                ok = (sharded_last if layout.kind == "rowwise" and d == layout.mesh_dim else p.is_replicate())
                if not ok:
                    reason = (f"input placement {tuple(xv.placements)} where {layout.kind} needs it "
                              f"{want[layout.kind]} on mesh dimension {layout.mesh_dim}: left to DTensor")
                    break
        n = w_val.shape[0]
        if (reason is None and layout.kind == "colwise" and n % layout.world
                and not all(isinstance(d, int) for d in xv.shape)):
            reason = (f"{n} outputs split unevenly over {layout.world} ranks with a dynamic shape "
                      "(DTensor.from_local needs the global shape): left to DTensor")
        if reason is not None:
            return SiteSharding(None, reason, on_dtensors)
    elif xv is not None and layout.kind == "rowwise" and xv.shape[-1] != layout.hi - layout.lo:
        return SiteSharding(None, f"input has {xv.shape[-1]} features, this rank's weight slice "
                            f"{layout.hi - layout.lo}: left dense", on_dtensors)
    return SiteSharding(layout, None, on_dtensors)


# -- calibration ------------------------------------------------------------------------------


def gather_channels(x: torch.Tensor, channels: int, group: Any) -> torch.Tensor:
    """The whole input of a row-parallel layer from the ranks' slices of its last dimension
    (``torch.chunk`` pieces of ``channels``, in rank order): a collective over ``group``."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    size = -(-channels // world)
    local = x.detach().contiguous()
    pad = size - local.shape[-1]
    if pad:
        local = torch.nn.functional.pad(local, (0, pad))
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=-1)[..., :channels]


def is_tensor_parallel(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor."""
    return any(is_dtensor(p) for p in model.parameters())


def same_on_every_rank(plan):
    """Rank 0's plan on every rank (one broadcast; the plan is plain data)."""
    import torch.distributed as dist

    from .plan import SparsityPlan

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return plan
    box = [plan.to_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return SparsityPlan.from_dict(box[0])


def writes_files() -> bool:
    """Whether this process writes shared files: rank 0 of a ``torch.distributed`` job, or a
    process outside one."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
