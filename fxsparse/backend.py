"""The ``sparse_act`` torch.compile backend: match -> (observe | lower -> group -> fuse_act ->
accumulate) -> Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so after ``pip install`` this works
without importing fxsparse::

    fast = torch.compile(model, backend="sparse_act", options={"plan": "plan.json"})

Options (``torch.compile(..., options={...})``; each is described in ``docs/backend.md``):
``plan`` (a ``SparsityPlan``, its path or dict; without one nothing is lowered), ``mode``
(Inductor's, inside ``options`` because torch.compile refuses ``mode`` and ``options`` together),
``inductor``, ``debug_dir``, ``observers`` and ``record`` (calibration and ``explain``),
``crossover_rows``, and the switches ``dense_when_faster``, ``group_siblings``,
``fuse_activations``, ``accumulate``, ``emulate_precision_casts`` (default on) and ``keep_taps``
(default off: record each site's judged input for ``fxsparse.keep_agreement``).

Graphs with a sparse site compile with Inductor's ``emulate_precision_casts``: Inductor fuses a
site's producers (RMSNorm, residual adds, RoPE, ``silu(gate) * up``) and would otherwise keep
their intermediates in float32 where eager rounds each to bf16/fp16, so entries near a
threshold would be judged on other values than eager judges and flip.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .passes import (
    accumulate_outputs,
    fuse_activations,
    group_siblings,
    insert_observers,
    lower_linears,
    match_linears,
    tap_inputs,
)
from .plan import SparsityPlan

__all__ = ["sparse_act", "BackendOptions"]

log = logging.getLogger("fxsparse")

_KNOWN = {"plan", "mode", "inductor", "debug_dir", "observers", "record", "crossover_rows",
          "dense_when_faster", "group_siblings", "fuse_activations", "accumulate", "emulate_precision_casts",
          "keep_taps"}
# devices whose graphs the accumulate pass rewrites (CUDA, where the kernel gains; tests add "cpu")
ACCUMULATE_DEVICES = ("cuda",)
_graph_counter = 0


class BackendOptions:
    """Validated options of one ``sparse_act`` compile (see module docstring)."""

    def __init__(self, options: Mapping[str, Any] | None, mode: str | None = None) -> None:
        options = dict(options or {})
        unknown = set(options) - _KNOWN
        if unknown:
            raise ValueError(
                f"sparse_act: unknown option(s) {sorted(unknown)}; known: {sorted(_KNOWN)}"
            )
        plan = options.get("plan")
        self.plan = SparsityPlan.coerce(plan) if plan is not None else None
        self.mode = options.get("mode", mode)
        if self.mode is not None and self.mode != "default":
            from torch._inductor import list_mode_options

            try:
                self.config_patches = dict(list_mode_options(self.mode))
            except Exception as e:  # torch raises RuntimeError on an unknown mode
                raise ValueError(f"sparse_act: unknown mode {self.mode!r}: {e}") from None
        else:
            self.config_patches = {}
        self.inductor = bool(options.get("inductor", True))
        debug = options.get("debug_dir") or os.environ.get("FXSPARSE_DEBUG_DIR")
        self.debug_dir = Path(debug) if debug else None
        self.observers = options.get("observers")
        self.record = options.get("record")
        if self.record is not None and not isinstance(self.record, list):
            raise TypeError("sparse_act: option 'record' must be a list")
        self.crossover_rows = options.get("crossover_rows")
        r = self.crossover_rows
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"sparse_act: option 'crossover_rows' must be an integer >= 0, got {r!r}")
        for flag, default in (("dense_when_faster", True), ("group_siblings", True),
                              ("fuse_activations", True), ("accumulate", True),
                              ("emulate_precision_casts", True), ("keep_taps", False)):
            value = options.get(flag, default)
            if not isinstance(value, bool):
                raise ValueError(f"sparse_act: option {flag!r} must be True or False, got {value!r}")
            setattr(self, flag, value)


def _code(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False)


_warned_no_plan = False


def sparse_act(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Dynamo backend: lower planned linears to the ``fxsparse`` ops, then Inductor."""
    global _graph_counter, _warned_no_plan
    opts = BackendOptions(options, mode)
    _graph_counter += 1
    gid = _graph_counter
    stages: dict[str, str] = {"input": _code(gm)}

    gm = match_linears(gm)
    if opts.observers is not None:
        resolve = opts.plan.resolve if opts.plan is not None else None
        gm = insert_observers(gm, opts.observers, resolve=resolve)
        stages["observe"] = _code(gm)
    if opts.plan is not None:
        gm = lower_linears(gm, opts.plan, example_inputs, crossover_rows=opts.crossover_rows,
                           cudagraphs=opts.mode == "reduce-overhead",
                           dense_when_faster=opts.dense_when_faster, grouped=opts.group_siblings)
        stages["lower"] = _code(gm)
        if opts.group_siblings:
            gm = group_siblings(gm, opts.plan)
            stages["group"] = _code(gm)
        if opts.fuse_activations:
            gm = fuse_activations(gm)
            stages["fuse_act"] = _code(gm)
        if opts.accumulate and not torch.are_deterministic_algorithms_enabled():
            gm = accumulate_outputs(gm, ACCUMULATE_DEVICES)
            stages["accumulate"] = _code(gm)
        if opts.keep_taps:
            gm = tap_inputs(gm)
            stages["tap"] = _code(gm)
    elif opts.observers is None and not _warned_no_plan:
        _warned_no_plan = True
        log.warning("sparse_act: no 'plan' option given; no linear layer is sparsified")

    decisions = gm.meta.get("fxsparse_decisions", [])
    if opts.record is not None:
        opts.record.append({"graph": gid, "stages": stages, "decisions": decisions})
    if opts.debug_dir is not None:
        opts.debug_dir.mkdir(parents=True, exist_ok=True)
        for stage, code in stages.items():
            (opts.debug_dir / f"graph{gid:03d}_{stage}.py").write_text(code)
    lowered = [d["name"] for d in decisions if d["op"] != "linear"]
    log.info("sparse_act: graph %d: %d of %d linear(s) lowered%s", gid, len(lowered),
             len(decisions), f" ({', '.join(lowered)})" if lowered else "")
    if log.isEnabledFor(logging.DEBUG):
        for stage, code in stages.items():
            log.debug("graph %d after %s:\n%s", gid, stage, code)

    if opts.observers is not None or not opts.inductor:
        return gm  # observers are Python modules; they run outside Inductor
    from torch._inductor.compile_fx import compile_fx

    patches = dict(opts.config_patches)
    if opts.emulate_precision_casts and any(d["op"] != "linear" for d in decisions):  # a sparse site
        patches.setdefault("emulate_precision_casts", True)
    return compile_fx(gm, example_inputs, config_patches=patches)


