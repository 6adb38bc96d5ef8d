"""Which op a planned linear runs: one plain function from a site's facts to a decision.

``decide(SiteFacts(...))`` returns a ``Decision``: the branch (``threshold``: the fused sparse op;
``mask+linear``: the mask as aten ops before a plain linear, for Inductor to fuse into x's
producer; ``dense``; ``2:4``; ``per-call``: the op picks by row count at run time), its reason,
and what the rewrite needs (the 2:4 crossover, a top-k keep count, an output cast). The lower
pass, ``prepare_weights`` and ``explain`` all call it, so a layer is never laid out for a kernel
it will not run, and every dense layer has its reason in one wording.

The facts are what a graph or a module tells: the plan entry, the weight's dtype and device, the
sibling set's width (one launch serves q/k/v), the call's row range (``None`` where unknown:
``prepare_weights`` has no graph), the autocast dtype around the call and, under tensor
parallelism, whether the rank's piece can run the op at all (``sharding.py``: the plan entry and
width are then that piece's), and for torchao-quantized weights (``quantized.py``) their 8-bit
format or why the kernel cannot read them. Measured crossovers (``kernels/crossover.py``) are looked up here,
not in the passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels import sparse_gemv
from .kernels.crossover import NEVER, gemv_pays, resolve_min_rows_24
from .kernels.prefill_linear import branch as prefill_branch
from .kernels.topk_linear import topk_keep_count
from .plan import LayerPlan, SparsityPlan

__all__ = ["BRANCHES", "Decision", "SiteFacts", "decide", "group_width", "kernel_rows", "sibling_sets",
           "static_branch"]

BRANCHES = ("threshold", "mask+linear", "dense", "2:4", "per-call")


@dataclass(frozen=True)
class SiteFacts:
    """What is known about one planned linear call (or layer, when ``rows`` is None)."""

    plan: LayerPlan
    device: torch.device
    weight_dtype: torch.dtype | None = None  # None: traced without a value
    input_dtype: torch.dtype | None = None  # x's dtype, the kernel's row limit when the weight's is unknown
    width: int | None = None  # output features the kernel runs at (the sibling set's total)
    rows: tuple[int, float] | None = None  # (lowest, highest) rows of the call; None: unknown
    has_bias: bool = False
    autocast: torch.dtype | None = None  # the dtype torch.autocast runs this call in, if any
    # tensor parallelism (sharding.py): why this rank's piece of the layer cannot run the sparse
    # op (a layout fxsparse does not slice), None when it can. With a layout it slices, ``plan``
    # and ``width`` are the rank's piece already.
    unsliceable: str | None = None
    # 8-bit weights (quantized.py): "fp8" or "int8" when the op reads a torchao weight's data and
    # scales; ``unreadable``: why the kernel cannot read a torchao weight (its own path runs).
    # ``weight_dtype`` is then the activation dtype: 8-bit layers are judged as 16-bit ones there
    # (dense_when_faster, the row limit; 8-bit crossovers are unmeasured).
    weights: str | None = None
    unreadable: str | None = None


@dataclass(frozen=True)
class Decision:
    branch: str  # one of BRANCHES
    reason: str  # "planned", or why not the fused op
    min_rows_24: int | None = None  # prefill entries: the row count from which 2:4 runs
    topk_k: int | None = None  # top-k entries: inputs kept per row
    cast_out: torch.dtype | None = None  # top-k under autocast: the op's output cast to this

    @property
    def plain(self) -> bool:
        """A plain ``linear`` (on x, or on its aten mask), no fxsparse op."""
        return self.branch in ("dense", "mask+linear")


def static_branch(rows: tuple[int, float] | None, decode_rows: int, min_rows_24: int) -> str | None:
    """The prefill branch every call takes when the row range lies within one, else None."""
    if rows is None:
        return None
    lo, hi = rows
    if lo > hi:
        return None
    first = prefill_branch(lo, decode_rows, min_rows_24)
    if hi == math.inf:  # unbounded: only a branch that holds for every larger count
        return first if first == "2:4" or (first == "dense" and min_rows_24 >= NEVER) else None
    return first if prefill_branch(int(hi), decode_rows, min_rows_24) == first else None


def kernel_rows(facts: SiteFacts) -> int:
    """Most rows the fused kernel takes for this site (above: mask + cuBLAS)."""
    lp = facts.plan
    dtype = facts.weight_dtype or facts.input_dtype or torch.float32
    return sparse_gemv.max_rows(lp.out_features, lp.in_features, dtype, lp.target_sparsity)


def _dense_reason(facts: SiteFacts, dense_when_faster: bool) -> str | None:
    """Why the entry runs dense at every row count: it drops nothing, or (``dense_when_faster``,
    weight dtype known) its one-row sparse GEMV measured slower than dense at its target
    sparsity, at the sibling set's width (k/v_proj alone lose, but ride along with q_proj)."""
    lp = facts.plan
    if lp.drops_nothing:
        return "threshold <= 0 drops nothing: dense is exact"
    if not dense_when_faster or facts.weight_dtype is None:
        return None
    if lp.prefill != "threshold" or lp.method == "topk":
        return None
    n = facts.width or lp.out_features
    pays, times = gemv_pays(n, lp.in_features, facts.weight_dtype, facts.device, lp.target_sparsity)
    if pays:
        return None
    return (f"sparse GEMV slower than dense here: {times[1]:.1f} vs {times[0]:.1f} us "
            f"at sparsity {lp.target_sparsity:.2f}, N = {n} (dense_when_faster)")


def _above_kernel_rows(facts: SiteFacts) -> str | None:
    """Why a threshold site's calls are left to mask + linear, or None: every call has more rows
    than the kernel takes, or the row count is dynamic from 2 up (Dynamo specialises 0 and 1:
    prefill's calls, whose few calls of exactly two rows lose less than a mask launch on
    every other call would cost)."""
    if facts.rows is None:
        return None
    lo, hi = facts.rows
    limit = kernel_rows(facts)
    if lo > limit:
        return (f"every call has >= {lo} rows (above the fused kernel's limit of {limit}): "
                "mask left to Inductor to fuse into x's producer")
    if lo > 1 and hi > limit:
        return (f"calls have {lo} to {hi} rows (mostly above the fused kernel's limit of "
                f"{limit}): mask left to Inductor to fuse into x's producer")
    return None


def decide(facts: SiteFacts, *, dense_when_faster: bool = True, crossover_rows: int | None = None,
           cudagraphs: bool = False) -> Decision:
    """The branch a planned site runs and why (see the module docstring).

    ``dense_when_faster``, ``crossover_rows``: the backend options of those names;
    ``cudagraphs``: the graph runs under CUDA graphs (crossovers measured on GPU time alone).
    """
    lp = facts.plan
    if facts.unsliceable is not None:
        return Decision("dense", f"tensor parallel: {facts.unsliceable}")
    if facts.unreadable is not None:
        return Decision("dense", f"weight not read by the sparse kernel: {facts.unreadable}; "
                                 "torchao's own path")
    quant = facts.weights is not None
    if quant and lp.method == "topk":
        return Decision("dense", "top-k layers read 16-bit weights only: torchao's own path")
    what, min_rows_24, reason = "threshold", None, _dense_reason(facts, dense_when_faster)
    if reason is not None:
        what = "dense"
    elif lp.prefill != "threshold":
        min_rows_24 = NEVER
        if lp.prefill == "2:4" and not quant:
            epilogue = facts.has_bias or lp.center_tensor() is not None
            min_rows_24 = resolve_min_rows_24(lp.out_features, lp.in_features,
                                              facts.weight_dtype or torch.float32, facts.device,
                                              crossover_rows, epilogue, cudagraphs)
        what = static_branch(facts.rows, lp.decode_rows, min_rows_24) or "per-call"
        if quant and what != "threshold":  # prefill_linear reads 16-bit weights only
            what = "dense"
            reason = (f"prefill {lp.prefill!r} with 8-bit weights: calls beyond the threshold branch run "
                      "torchao's own path")
    if what == "threshold" and lp.method != "topk":  # never the kernel: mask left to Inductor
        reason = _above_kernel_rows(facts)
        what = "mask+linear" if reason else what
    cast_out = None
    if facts.autocast is not None and what != "dense":
        dev = facts.device.type
        if lp.method == "topk":
            cast_out = facts.autocast
            reason = f"under torch.autocast({dev!r}, {facts.autocast}): output cast to it"
        else:
            what = "mask+linear"
            reason = (f"under torch.autocast({dev!r}, {facts.autocast}): the mask in x's dtype, "
                      "then the autocast linear, as eager runs it")
    topk_k = topk_keep_count(lp.in_features, lp.target_sparsity or 0.0) if lp.method == "topk" else None
    return Decision(what, reason or "planned", min_rows_24, topk_k, cast_out)


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
    or gate/up. Decided on the plan alone, so ``prepare_weights`` and the passes agree."""
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


def group_width(plan: SparsityPlan, members: tuple[str, ...]) -> int:
    """Output features the kernel runs at for one launch over ``members`` (an entry's sibling
    set, or the entry alone when siblings are not grouped): their total."""
    return sum(plan.layers[m].out_features for m in members)
