"""``fxsparse.explain``: what the backend does to a model, and what it achieves on an input.

It compiles the model with ``sparse_act`` (without Inductor, so graphs stay readable), with an
exact probe on every planned layer, runs the given input once, and reports:

* each graph Dynamo produced, as code, after every pass (``input``, ``observe``, ``lower``,
  ``group``, ``fuse_act``, ``accumulate``);
* a per-layer table: name, target, threshold, center, sparsity measured on this input, the op
  chosen, weight bytes a batch-1 decode step reads dense vs expected sparse, and for every linear
  left dense the reason (ignored scope, not targeted, not in the plan, not called, or a planned
  layer lowered to a plain linear: a threshold that drops nothing, ``dense_when_faster``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dispatch import SiteFacts, kernel_rows
from .evaluation import make_probe
from .plan import LayerPlan, SparsityPlan, linear_layers, uncompiled

__all__ = ["explain", "keep_agreement", "Report", "LayerRow"]


@dataclass
class LayerRow:
    name: str
    op: str
    reason: str
    target: float | None = None
    threshold: float | None = None
    center: float | str | None = None
    sparsity: float | None = None  # measured on the given input
    token_std: float | None = None  # spread of the per-token dropped fraction
    calls: int = 0
    kernel: str = "-"  # implementation per row range on the model's device
    dense_bytes: int = 0
    sparse_bytes: int | None = None  # expected weight bytes of one decode step (planned layers)
    keep_differs: float | None = None  # compare_eager: fraction of keep decisions unlike eager's

    @property
    def runs_dense(self) -> bool:
        """A planned layer the lower pass made a plain linear at every row count: it skips
        nothing, whatever its threshold would drop (the sparsity column)."""
        return self.sparse_bytes is not None and self.reason != "planned" and self.op == "linear"


@dataclass
class Report:
    graphs: list[dict[str, Any]] = field(default_factory=list)
    rows: list[LayerRow] = field(default_factory=list)

    def table(self) -> str:
        head = (f"{'layer':44s} {'op':31s} {'target':>6s} {'thresh':>9s} {'center':>8s} "
                f"{'sparsity':>8s} {'±tok':>6s} {'MB dense':>8s} {'MB sparse':>9s}  kernel / note")
        lines = [head, "-" * len(head)]
        fmt = lambda v, f: "-" if v is None else format(v, f)
        for r in self.rows:
            center = r.center if isinstance(r.center, str) else fmt(r.center, ".3g")
            lines.append(
                f"{r.name:44s} {r.op:31s} {fmt(r.target, '.2f'):>6s} {fmt(r.threshold, '.3g'):>9s} "
                f"{center:>8s} {fmt(r.sparsity, '.3f'):>8s} {fmt(r.token_std, '.3f'):>6s} "
                f"{r.dense_bytes / 1e6:8.2f} "
                f"{fmt(None if r.sparse_bytes is None else r.sparse_bytes / 1e6, '9.2f'):>9s}  "
                f"{r.kernel if r.reason == 'planned' else r.reason}"
            )
        planned = [r for r in self.rows if r.sparse_bytes is not None]
        dense = sum(r.dense_bytes for r in self.rows)
        saved = sum(r.dense_bytes - r.sparse_bytes for r in planned)
        # the reasons' heads: "threshold <= 0 drops nothing", "sparse GEMV slower than dense here"
        why = Counter(r.reason.split(":")[0] for r in planned if r.runs_dense)
        k = sum(why.values())
        run_dense = "" if not k else (
            f" ({k} planned {'layer runs' if k == 1 else 'layers run'} dense: "
            + ", ".join(f"{reason} ({n})" for reason, n in why.items()) + ")")
        lines.append(f"{len(planned) - k} of {len(self.rows)} linears sparsified{run_dense}; expected "
                     f"weight bytes per decode step {dense / 1e6:.1f} MB -> "
                     f"{(dense - saved) / 1e6:.1f} MB")
        compared = [r for r in self.rows if r.keep_differs is not None]
        if compared:
            worst = max(compared, key=lambda r: r.keep_differs)
            lines.append(f"keep decisions unlike eager's (compiled with the given options): worst "
                         f"{worst.keep_differs:.2e} ({worst.name}), mean "
                         f"{sum(r.keep_differs for r in compared) / len(compared):.2e} "
                         f"over {len(compared)} layers")
            lines += [f"  {r.name}: {r.keep_differs:.2e}" for r in compared if r.keep_differs > 0]
        return "\n".join(lines)

    def graph_code(self) -> str:
        parts = []
        for g in self.graphs:
            for stage, code in g["stages"].items():
                parts.append(f"# ==== graph {g['graph']} after {stage} ====\n{code}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.graph_code() + "\n" + self.table()

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``table.txt``, ``layers.json`` and one file per graph and pass into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.txt").write_text(self.table() + "\n")
        (folder / "layers.json").write_text(json.dumps([asdict(r) for r in self.rows], indent=1))
        for g in self.graphs:
            for stage, code in g["stages"].items():
                (folder / f"graph{g['graph']:03d}_{stage}.py").write_text(code)
        return folder


def _kernel_description(d: dict[str, Any], device: torch.device, lp: LayerPlan, dtype: torch.dtype) -> str:
    """Which implementation runs for which row count (the ops dispatch at run time)."""
    op = d["op"]
    others = [n.rpartition(".")[2] for n in d.get("group", []) if n != d["name"]]
    shared = f"; one mask and launch with {', '.join(others)}" if others else ""
    prologue = d.get("prologue")  # passes/fuse_act.py
    fused = "" if not prologue else f"; input {prologue} " + (
        "computed in the kernel" if device.type == "cuda" else "computed by the op")
    if d.get("accumulate"):  # passes/accumulate.py
        fused += "; float32 output (split-K atomics), rounded by its reader"
    if d.get("tp"):  # sharding.py: this rank's piece of a tensor-parallel layer
        fused += f"; tensor parallel: {d['tp']} here"
    if d.get("prefill", "threshold") != "threshold":  # grouped in decode graphs too (group.py)
        return _prefill_ranges(d, device) + fused + shared
    if op == "mask+linear":  # every call above the kernel's row limit (dispatch.py)
        return "aten mask (fused into x's producer by Inductor) + " + (
            "cuBLAS" if device.type == "cuda" else "matmul") + ", every call of this graph"
    if op not in ("fxsparse.threshold_linear", "fxsparse.threshold_linear_group",
                  "fxsparse.threshold_linear_act"):
        return "torch composition"
    if device.type != "cuda":
        return "torch reference (mask, then matmul)" + fused + shared
    rows = kernel_rows(SiteFacts(plan=lp, device=device, weight_dtype=dtype))
    return (f"Triton sparse GEMV <= {rows} row(s), mask + cuBLAS above"
            + fused + shared)


def _prefill_ranges(d: dict[str, Any], device: torch.device) -> str:
    """``"1-16 gemv/threshold, 17-2047 dense, >=2048 2:4"``: the branch per row count."""
    from .kernels.crossover import NEVER

    decode, m24 = int(d["decode_rows"]), int(d["min_rows_24"])
    parts = []
    if decode >= 1:
        parts.append(f"1-{decode} " + ("gemv/threshold" if device.type == "cuda" else "threshold"))
    first = decode + 1
    if m24 > first:
        parts.append(f"{first}-{m24 - 1} dense" if m24 < NEVER else f">={first} dense")
    if m24 < NEVER:
        parts.append(f">={max(m24, first)} 2:4" + ("" if device.type == "cuda" else " (torch reference)"))
    text = ", ".join(parts)
    if d.get("branch") not in (None, "per-call"):
        text += f"; this graph: {d['branch']} only (row count known at compile time)"
    return text


def _element_size(p: torch.Tensor) -> int:
    """Bytes per weight element as a step reads it: a torchao 8-bit weight's data, else the tensor's."""
    from .quantized import is_torchao, weight_format

    fmt = weight_format(p) if is_torchao(p) else None
    return fmt.qdata.element_size() if fmt is not None and fmt.quantized else p.element_size()


def _center_repr(center: float | list[float]) -> float | str:
    return f"[{len(center)}]" if isinstance(center, list) else float(center)


@torch.no_grad()
def explain(
    model: nn.Module,
    *args: Any,
    plan: SparsityPlan | str | os.PathLike,
    dump_dir: str | os.PathLike | None = None,
    compare_eager: bool | Mapping[str, Any] = False,
    **kwargs: Any,
) -> Report:
    """Compile ``model`` with ``plan``, run ``model(*args, **kwargs)`` once, report per layer.

    ``compare_eager``: also compile it through Inductor (``True``, or a dict of backend options
    such as ``{"mode": "reduce-overhead"}``) and report per layer the fraction of keep decisions
    that differ from eager's (``keep_agreement``).

    Example::

        report = fxsparse.explain(model, input_ids, plan="plan.json")
        print(report.table())
    """
    plan = SparsityPlan.coerce(plan)
    model = uncompiled(model)  # a torch.compile wrapper: explain the module it holds
    plan.check_model(model)
    linears = linear_layers(model)
    observers = {name: make_probe(name, lp) for name, lp in plan.layers.items()}
    record: list[dict[str, Any]] = []
    compiled = torch.compile(
        model, backend="sparse_act",
        options={"plan": plan, "observers": observers, "record": record, "inductor": False},
    )
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        kwargs.setdefault("use_cache", False)
    compiled(*args, **kwargs)

    report = Report(graphs=record)
    seen: dict[str, LayerRow] = {}
    elem = {n: _element_size(p) for n, p in model.named_parameters(remove_duplicate=False)}  # tied too
    modules = dict(model.named_modules())
    for g in record:
        for d in g["decisions"]:
            key = d.get("plan_key", d["name"])
            if key in seen:
                seen[key].calls += 1
                continue
            out_f, in_f = linears.get(key, (0, 0))
            wbytes = out_f * in_f * elem.get(f"{key}.weight", 2)
            row = LayerRow(name=key, op=d["op"], reason=d["reason"], calls=1, dense_bytes=wbytes)
            if key in plan.layers:
                lp = plan.layers[key]
                stats = observers[key].probe_stats()
                row.target, row.threshold = lp.target_sparsity, lp.threshold
                row.center = _center_repr(lp.center)
                row.sparsity, row.token_std = stats["sparsity"], stats["token_std"]
                row.sparse_bytes = int(round(wbytes * (1.0 - stats["sparsity"])))
                w = modules[key].weight
                row.kernel = _kernel_description(d, w.device, lp, w.dtype)
                if row.runs_dense:  # dispatch.decide chose dense: reads the whole weight
                    row.sparse_bytes, row.kernel = wbytes, "plain linear at every row count"
            seen[key] = row
    for name, (out_f, in_f) in linears.items():
        if name not in seen:
            reason = "not called in this forward" if name not in plan.layers else "planned, not called"
            seen[name] = LayerRow(name=name, op="-", reason=reason,
                                  dense_bytes=out_f * in_f * elem.get(f"{name}.weight", 2))
    order = list(linears)
    report.rows = sorted(seen.values(), key=lambda r: order.index(r.name) if r.name in order else 1e9)
    if compare_eager is not False:
        options = {} if compare_eager is True else dict(compare_eager)
        differs = keep_agreement(model, *args, plan=plan, options=options, **kwargs)
        for r in report.rows:
            if r.name in differs:
                r.keep_differs = differs[r.name]["fraction"]
    if dump_dir is not None:
        report.save(dump_dir)
    return report


@torch.no_grad()
def keep_agreement(model: nn.Module, *args: Any, plan: SparsityPlan | str | os.PathLike,
                   options: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """How often the compiled model's masks differ from eager's, per planned layer.

    Runs ``model(*args, **kwargs)`` once compiled by ``sparse_act`` with ``options`` (Inductor
    included unless they say otherwise) and the backend's ``keep_taps``, once eagerly with the
    plan's hooks (``fxsparse.reference``), and compares the keep decisions each layer's plan
    entry makes on the inputs each side judged. Differences come from inputs computed with other
    rounding (fused producers, another summation order), each flip moving later layers' inputs.
    Returns ``{layer: {"calls", "entries", "differ", "fraction"}}``; sibling layers that share a
    mask (one tap) report the same. Calls with more rows than ``decode_rows`` of a dense- or
    2:4-prefill entry are not compared (no threshold decides them).
    """
    from .dispatch import sibling_sets
    from .kernels import tap
    from .reference import keep_mask, plan_hooks

    plan = SparsityPlan.coerce(plan)
    model = uncompiled(model)
    plan.check_model(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        kwargs.setdefault("use_cache", False)
    tap.RECORDS.clear()
    compiled = torch.compile(model, backend="sparse_act",
                             options={**dict(options or {}), "plan": plan, "keep_taps": True})
    try:
        compiled(*args, **kwargs)
        got = {k: list(v) for k, v in tap.RECORDS.items()}
    finally:
        tap.RECORDS.clear()
    eager: dict[str, list[torch.Tensor]] = {name: [] for name in plan.layers}  # inputs before the mask
    with plan_hooks(model, plan, probes={n: (lambda x, n=n: eager[n].append(x.detach().clone()))
                                         for n in plan.layers}):
        model(*args, **kwargs)
    out: dict[str, dict[str, Any]] = {}
    for name, xs in got.items():
        lp = plan.layers[name]
        c, sc = (None if t is None else t.to(xs[0].device) for t in (lp.center_tensor(), lp.scale_tensor()))
        calls = entries = differ = 0
        for xc, xe in zip(xs, eager[name], strict=False):
            if xc.shape != xe.shape:
                continue
            rows = xc.numel() // max(xc.shape[-1], 1)
            if lp.prefill != "threshold" and rows > lp.decode_rows:
                continue
            keep = [keep_mask(lp, v, c, sc) for v in (xc, xe)]
            calls, entries = calls + 1, entries + keep[0].numel()
            differ += int((keep[0] != keep[1]).sum())
        out[name] = {"calls": calls, "entries": entries, "differ": differ,
                     "fraction": differ / entries if entries else 0.0}
    for name, members in sibling_sets(plan).items():
        tapped = [m for m in members if m in got]
        if name not in out and tapped:
            out[name] = dict(out[tapped[0]])
    return out

