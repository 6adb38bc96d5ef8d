"""Calibration methods compared on SmolLM2-135M: perplexity at 30/40/50% sparsity, per-layer ratios.

One calibration pass (Lee news, 32 windows x 256 tokens spread evenly over the corpus,
``--calib-windows``; ``--first-windows`` takes the corpus' first windows instead) records the
statistics of every method (``fxsparse.methods.collect_method_statistics``); every (method,
target) plan is derived from those observers without touching the data again and scored on
held-out English Wikipedia (8 windows x 256 tokens) with eager hooks and exact per-layer probes
(``evaluate(..., engine="hooks")``: the compiled op's masks, no Dynamo tracing per plan). Two
scopes: all seven projections of every block ("all"), and the MLP inputs only ("mlp").
Writes bench/results/methods_table.md, methods.json, sparsity_per_layer.png, ppl_vs_sparsity.png.

The committed table (CPU, one thread, ~35 min for the base rows): base rows and the MLP-only and
PPL-p% rows on the first 8 Lee windows, the all-projection refined rows (marked †) with the
defaults:

    OMP_NUM_THREADS=1 python bench/methods.py --calib-windows 8 --first-windows
    OMP_NUM_THREADS=1 python bench/methods.py --refined --pplp-p 1 5 --calib-windows 8 --first-windows
    OMP_NUM_THREADS=1 python bench/methods.py --refined --parts all

``--tiny`` runs the same code on a random tiny Llama in a few seconds (a smoke test);
``--replot`` redraws the plots and table from methods.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy
from fxsparse.attribution import attribution_scores  # noqa: E402
from fxsparse.evaluation import evaluate  # noqa: E402
from fxsparse.methods import (  # noqa: E402
    allocate_sparsity,
    collect_method_statistics,
    plan_from_observers,
    refine_plan,
)
from fxsparse.plan import linear_layers, size_weighted_mean  # noqa: E402
from fxsparse.plots import plot_activation_ratio, plot_ppl_vs_sparsity  # noqa: E402

OUT = Path(__file__).parent / "results"
SPARSITIES = (0.3, 0.4, 0.5)
# (label, method, options); "alloc" is quantile with per-layer targets from allocate_sparsity.
METHODS = [
    ("quantile", "quantile", {}),
    ("quantile-ema (NNCF rule)", "quantile", {"quantile_ema": True}),
    ("mode-median", "mode", {"center": "median"}),
    ("mode-kde", "mode", {"center": "kde"}),
    ("norm", "norm", {}),
    ("topk", "topk", {}),
    ("fat", "fat", {}),
    ("pplp (CETT, matched)", "pplp", {}),
    ("attr-gradient", "attribution", {"metric": "gradient"}),
    ("attr-gxo", "attribution", {"metric": "gxo"}),
    ("attr-snip", "attribution", {"metric": "snip"}),
    ("attr-ig", "attribution", {"metric": "ig"}),
    ("attr-cor_gxo", "attribution", {"metric": "cor_gxo"}),
    ("quantile + alloc", "alloc", {}),
]


def _setup(tiny: bool, calib_windows: int = 8, spread: bool = False):
    """(model, calibration windows, enwiki ids, window, eval windows, held-out Lee ids).

    ``spread``: the calibration windows are evenly spaced over the Lee corpus
    (``token_chunks(spread=True)``) and the held-out Lee text is 8 windows half-way between
    calibration windows (never overlapping them); else the first ``calib_windows`` windows, and
    held-out Lee is the corpus' last 8 windows.
    """
    if tiny:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from conftest import tiny_llama, token_batches

        model = tiny_llama()
        calib = token_batches(4, batch=1, seq=32, seed=1)
        ids = torch.cat([b.reshape(-1) for b in token_batches(4, batch=1, seq=32, seed=2)])
        held = torch.cat([b.reshape(-1) for b in token_batches(4, batch=1, seq=32, seed=3)])
        return model, calib, ids, 32, 4, held
    from fxsparse.data import enwiki_text, lee_text, load_model, token_chunks

    model, tok = load_model()
    window = 256
    text = lee_text()
    calib = token_chunks(tok, text, window, calib_windows, spread=spread)
    lee = tok(text, return_tensors="pt").input_ids[0]
    total = lee.numel() // window
    if spread:
        step = total / calib_windows
        starts = [int(i * total // calib_windows + step / 2)
                  for i in range(0, calib_windows, max(calib_windows // 8, 1))][:8]
    else:
        starts = list(range(total - 8, total))
        assert calib_windows <= total - 8, "calibration windows would overlap held-out Lee"
    held = torch.cat([lee[i * window:(i + 1) * window] for i in starts])
    ids = tok(enwiki_text(), return_tensors="pt").input_ids[0]
    return model, calib, ids, window, 8, held


def _scopes(model) -> dict[str, list[str]]:
    names = [n for n in linear_layers(model) if n.endswith("_proj")]
    return {"all": names, "mlp": [n for n in names if ".mlp." in n]}


def run(tiny: bool, out: Path, calib_windows: int = 32, spread: bool = True) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, calib, ids, window, windows, _ = _setup(tiny, calib_windows, spread)
    for p in model.parameters():
        p.requires_grad_(True)
    scopes = _scopes(model)
    sizes = linear_layers(model)
    log = print
    log(f"model ready in {time.perf_counter() - t0:.0f} s; {len(scopes['all'])} layers", flush=True)

    t = time.perf_counter()
    scores = attribution_scores(model, calib, scopes["all"],
                                metrics=("gradient", "gxo", "snip", "cor_gxo"))
    scores.update(attribution_scores(model, calib[:2], scopes["all"], metrics=("ig",), n_steps=4))
    log(f"attribution scores in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    torch.compiler.reset()
    stats = collect_method_statistics(model, calib, scopes["all"],
                                      methods=("quantile", "norm", "pplp", "attribution"),
                                      scores=scores, progress=False)
    log(f"calibration pass in {time.perf_counter() - t:.0f} s ({stats.tokens} tokens)", flush=True)

    dense_cache: dict = {}
    result = {"model": "SmolLM2-135M" if not tiny else "tiny random Llama",
              "calibration": {"text": "lee", "windows": len(calib), "window": window,
                              "spread": spread},
              "evaluation": {"text": "enwiki", "windows": windows, "window": window},
              "sparsities": list(SPARSITIES), "runs": []}
    for scope, names in scopes.items():
        for label, method, opts in METHODS:
            for s in SPARSITIES if scope == "all" or tiny else (0.4,):
                t = time.perf_counter()
                if method == "alloc":
                    targets = allocate_sparsity(model, calib, names, s, max_tokens=window)
                    plan = plan_from_observers(stats, targets, "quantile")
                else:
                    plan = plan_from_observers(stats, dict.fromkeys(names, s), method, **opts)
                _record(result, model, ids, plan, window, windows, dense_cache, sizes, scope, label,
                        method, opts, s, t, out)
    result["seconds"] = time.perf_counter() - t0
    (out / "methods.json").write_text(json.dumps(result, indent=1))
    return result


def _record(result, model, ids, plan, window, windows, dense_cache, sizes, scope, label, method,
            opts, s, t, out, extra=None, calibration=None) -> dict:
    """Score one plan on the held-out text, append it to ``result`` and save the JSON.

    ``extra``: ``{name: (ids, dense cache)}``, more held-out texts on which to measure the
    per-layer sparsity (held-out Lee separates what a shift of text costs from what calibration
    misses; enwiki windows spread over the dump average over many articles).
    ``calibration``: how this run was calibrated, when not as ``result["calibration"]``.
    """
    r = evaluate(model, ids, plan, window=window, max_windows=windows, progress=False,
                 engine="hooks", dense_cache=dense_cache)
    measured = {n: v["sparsity"] for n, v in r.layers.items()}
    targets = {n: lp.target_sparsity for n, lp in plan.layers.items()}
    dev = {n: measured[n] - targets[n] for n in measured if targets[n] is not None}
    worst = max(dev, key=lambda n: abs(dev[n])) if dev else None
    run_ = {"scope": scope, "label": label, "method": method, "options": opts,
            "target": s, "dense_ppl": r.dense_ppl, "ppl": r.sparse_ppl,
            "agreement": r.agreement, "tokens": r.tokens,
            "mean_sparsity": sum(measured.values()) / len(measured),
            "weighted_sparsity": size_weighted_mean(measured, sizes),
            "worst_layer": worst, "worst_dev": dev[worst] if worst else None,
            "per_layer": measured, "per_layer_target": targets,
            "token_std_mean": sum(v["token_std"] for v in r.layers.values()) / len(r.layers),
            "meta": {k: v for k, v in plan.meta.items() if k != "search"},
            "seconds": time.perf_counter() - t}
    if calibration is not None:
        run_["calibration"] = calibration
    for name, (held, cache) in (extra or {}).items():
        h = evaluate(model, held, plan, window=window, progress=False, engine="hooks",
                     dense_cache=cache)
        hm = {n: v["sparsity"] for n, v in h.layers.items()}
        hdev = {n: hm[n] - targets[n] for n in hm if targets[n] is not None}
        hw = max(hdev, key=lambda n: abs(hdev[n])) if hdev else None
        run_.setdefault("extra_sets", {})[name] = {
            "per_layer": hm, "worst_layer": hw, "worst_dev": hdev[hw] if hw else None,
            "windows": held.numel() // window, "ppl": h.sparse_ppl, "dense_ppl": h.dense_ppl}
        run_["seconds"] = time.perf_counter() - t
    result["runs"] = [x for x in result["runs"] if not (x["scope"] == scope and x["label"] == label
                                                         and x["target"] == s)] + [run_]
    print(f"{scope:3s} {label:26s} s={s:.1f} ppl {r.dense_ppl:7.3f} -> {r.sparse_ppl:8.3f} "
          f"({100 * (r.sparse_ppl / r.dense_ppl - 1):+6.1f}%) mean sp "
          f"{run_['mean_sparsity']:.3f} worst {worst} {run_['worst_dev'] or 0:+.3f}"
          + "".join(f"; {k}: worst {v['worst_layer']} {v['worst_dev'] or 0:+.3f}"
                    for k, v in run_.get("extra_sets", {}).items())
          + f" [{run_['seconds']:.0f} s]", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(result, indent=1))
    return run_


def run_refined(tiny: bool, out: Path, pplp_p: tuple[float, ...] = (),
                parts: tuple[str, ...] = ("all", "mlp"), calib_windows: int = 32,
                spread: bool = True) -> dict:
    """quantile and mode-median with one ``refine_plan`` step (sparse-aware recalibration), and
    PPL-p% plans for each ``pplp_p`` (search on the calibration text), merged into an existing
    methods.json; the PPL-p% plans (per-layer thresholds) are saved next to it.

    ``parts``: "all" (refined rows of the all-projections table, also measured on held-out
    Lee), "mlp" (the MLP-only rows at 20-50%). Each run records its calibration set."""
    t0 = time.perf_counter()
    result = json.loads((out / "methods.json").read_text())
    model, calib, ids, window, windows, held = _setup(tiny, calib_windows, spread)
    calibration = {"text": "lee", "windows": len(calib), "window": window, "spread": spread}
    names = _scopes(model)["all"]
    sizes = linear_layers(model)
    torch.compiler.reset()
    dense_cache: dict = {}
    if "all" in parts:
        stats = collect_method_statistics(model, calib, names, methods=("quantile",),
                                          progress=False)
        total = ids.numel() // window
        spread_ids = torch.cat([ids[i * total // 32 * window:(i * total // 32 + 1) * window]
                                for i in range(32)])
        extra = {"held-out Lee": (held, {}),
                 "enwiki, 32 windows spread over the dump": (spread_ids, {})}
        for label, method, opts in (("quantile (refined)", "quantile", {}),
                                    ("mode-median (refined)", "mode", {"center": "median"})):
            for s in SPARSITIES:
                t = time.perf_counter()
                plan = plan_from_observers(stats, dict.fromkeys(names, s), method, **opts)
                plan = refine_plan(model, calib, plan, iterations=1, **opts)
                _record(result, model, ids, plan, window, windows, dense_cache, sizes, "all",
                        label, method, {**opts, "refine": 1}, s, t, out, extra=extra,
                        calibration=calibration)
    if "mlp" in parts:
        _refined_mlp(result, model, calib, ids, window, windows, dense_cache, sizes, out,
                     calibration)
    if pplp_p:
        _pplp_rows(result, model, calib, ids, window, windows, dense_cache, sizes, out, names,
                   pplp_p, calibration)
    result["seconds_refined"] = time.perf_counter() - t0
    (out / "methods.json").write_text(json.dumps(result, indent=1))
    return result


def _refined_mlp(result, model, calib, ids, window, windows, dense_cache, sizes, out,
                 calibration) -> None:
    # Where does the MLP-only curve cross +5%? quantile / norm / refined quantile at low targets.
    mlp = _scopes(model)["mlp"]
    torch.compiler.reset()
    stats = collect_method_statistics(model, calib, mlp, methods=("quantile", "norm"),
                                      progress=False)
    for label, method, opts, refine in (("quantile", "quantile", {}, 0), ("norm", "norm", {}, 0),
                                        ("quantile (refined)", "quantile", {}, 1)):
        for s in (0.2, 0.3, 0.4, 0.5):
            t = time.perf_counter()
            plan = plan_from_observers(stats, dict.fromkeys(mlp, s), method, **opts)
            if refine:
                plan = refine_plan(model, calib, plan, iterations=refine, **opts)
            _record(result, model, ids, plan, window, windows, dense_cache, sizes, "mlp", label,
                    method, {**opts, "refine": refine}, s, t, out, calibration=calibration)


def _pplp_rows(result, model, calib, ids, window, windows, dense_cache, sizes, out, names,
               pplp_p, calibration) -> None:
    stats = collect_method_statistics(model, calib, names, methods=("pplp",), progress=False)
    for p in pplp_p:
        t = time.perf_counter()
        plan = plan_from_observers(stats, dict.fromkeys(names, 0.0), "pplp", p=p, model=model,
                                   data=calib)
        print(f"pplp p={p}%: CETT {plan.meta['cett']:.4f}, search {plan.meta['search']}; "
              "per-layer thresholds on |x|*||W_i||: " + ", ".join(
                  f"{n.replace('model.layers.', '')}={lp.threshold:.4g}"
                  for n, lp in plan.layers.items()), flush=True)
        (out / f"methods_pplp_p{p:g}_thresholds.json").write_text(json.dumps({
            "p": p, "cett": plan.meta["cett"], "criterion": "|x_i| * ||W[:, i]||_2 < threshold",
            "search": plan.meta["search"],
            "layers": {n: {"threshold": lp.threshold, "calibrated_sparsity": lp.calibrated_sparsity}
                       for n, lp in plan.layers.items()}}, indent=1))
        _record(result, model, ids, plan, window, windows, dense_cache, sizes, "pplp",
                f"pplp p={p:g}%", "pplp", {"p": p}, p / 100.0, t, out,
                calibration=calibration)


def table(result: dict) -> str:
    runs = result["runs"]
    dense = runs[0]["dense_ppl"]
    lines = [f"# Calibration methods on {result['model']}",
             "",
             f"Calibration: {result['calibration']['windows']} x {result['calibration']['window']} "
             f"tokens of Lee news; evaluation: {result['evaluation']['windows']} x "
             f"{result['evaluation']['window']} tokens of enwiki (held out). Dense perplexity "
             f"**{dense:.3f}**. Cells: perplexity (change vs dense) / sparsity achieved on the "
             "held-out text (mean over layers weighted by weight size, i.e. share of the "
             "multiply-adds skipped).", ""]
    base = _calib_text(result["calibration"])
    window = result["evaluation"]["window"]
    others = sorted({_calib_text(r["calibration"]) for r in runs if "calibration" in r} - {base})
    marks = {c: "†" * (i + 1) for i, c in enumerate(others)}
    for c, m in marks.items():
        which = sorted({f"{r['label']} ({r['scope']})" for r in runs
                        if r.get("calibration") and _calib_text(r["calibration"]) == c})
        lines += [f"{m} Rows calibrated on {c} instead, regenerated with `--refined`: "
                  + ", ".join(which) + ".", ""]
    for scope, title in (("all", "All seven projections of every block"),
                         ("mlp", "MLP inputs only (gate/up/down)")):
        rs = [r for r in runs if r["scope"] == scope]
        if not rs:
            continue
        targets = sorted({r["target"] for r in rs})
        lines += [f"## {title}", "",
                  "| method | " + " | ".join(f"{int(100 * s)}%" for s in targets) + " |",
                  "|---|" + "---|" * len(targets),
                  "| dense | " + " | ".join(f"{dense:.2f}" for _ in targets) + " |"]
        order = [m[0] for m in METHODS] + ["quantile (refined)", "mode-median (refined)"]
        for label in sorted(dict.fromkeys(r["label"] for r in rs),
                            key=lambda x: order.index(x) if x in order else len(order)):
            cells = []
            for s in targets:
                r = next((r for r in rs if r["label"] == label and r["target"] == s), None)
                cells.append("-" if r is None else
                             f"{r['ppl']:.2f} ({100 * (r['ppl'] / dense - 1):+.0f}%) / "
                             f"{r['weighted_sparsity']:.2f}")
            mark = "".join(sorted({marks.get(_calib_text(r["calibration"]), "") for r in rs
                                   if r["label"] == label and "calibration" in r}))
            lines.append(f"| {label}{mark} | " + " | ".join(cells) + " |")
        lines.append("")
        for label in ("quantile", "mode-median", "mode-kde", "quantile (refined)",
                      "mode-median (refined)"):
            worst = sorted((r for r in rs if r["label"] == label and r["worst_dev"] is not None),
                           key=lambda r: r["target"])
            if worst:
                lines.append(f"- {label}, worst layer on held-out text: " + "; ".join(
                    f"target {w['target']:.0%}: {w['worst_layer'].replace('model.layers.', '')} "
                    f"{w['target'] + w['worst_dev']:.3f} ({100 * w['worst_dev']:+.1f} points)"
                    for w in worst))
            sets = dict.fromkeys(k for w in worst for k in w.get("extra_sets", {}))
            for k in sets:
                ws = [(w, w["extra_sets"][k]) for w in worst if k in w.get("extra_sets", {})]
                lines.append(f"- {label}, worst layer on {k} ({ws[0][1]['windows']} x {window}): "
                             + "; ".join(f"target {w['target']:.0%}: "
                                         f"{e['worst_layer'].replace('model.layers.', '')} "
                                         f"{w['target'] + e['worst_dev']:.3f} "
                                         f"({100 * e['worst_dev']:+.1f} points)" for w, e in ws))
        at40 = [r for r in rs if abs(r["target"] - 0.4) < 1e-9
                and abs(r["weighted_sparsity"] - 0.4) <= 0.03]
        if at40:
            best = min(at40, key=lambda r: r["ppl"])
            lines.append(f"- best at 40% (among runs achieving 40% ± 3 points): {best['label']}, "
                         f"perplexity {best['ppl']:.3f} ({100 * (best['ppl'] / dense - 1):+.1f}% "
                         "vs dense)")
        lines.append("")
    pp = [r for r in runs if r["scope"] == "pplp"]
    if pp:
        lines += ["## PPL-p% (Sparsing Law): thresholds searched on the calibration text", "",
                  "All seven projections; per-layer thresholds on |x_i|·‖W[:, i]‖ from one common "
                  "CETT budget (orthogonal-column proxy), the largest whose calibration perplexity "
                  "rises by at most p%. Every layer's threshold: `methods_pplp_p*_thresholds.json`.", "",
                  "| p | CETT | sparsity (weighted) | sparsity range over layers | held-out ppl |",
                  "|---|---|---|---|---|"]
        for r in pp:
            v = list(r["per_layer"].values())
            lines.append(f"| {r['options']['p']:g}% | {r['meta']['cett']:.4f} | "
                         f"{r['weighted_sparsity']:.3f} | {min(v):.2f}–{max(v):.2f} | "
                         f"{r['ppl']:.2f} ({100 * (r['ppl'] / dense - 1):+.1f}%) |")
        lines.append("")
    if "seconds" in result:
        lines.append(f"Run time {result['seconds'] / 60:.0f} min"
                     + (f" + {result['seconds_refined'] / 60:.0f} min (refined rows)"
                        if "seconds_refined" in result else "") + ".")
    return "\n".join(lines) + "\n"


def _calib_text(c: dict) -> str:
    return (f"{c['windows']} x {c['window']} Lee tokens"
            + (" spread over the corpus" if c.get("spread") else " (the first windows)"))


def plots(result: dict, out: Path) -> None:
    runs = result["runs"]
    per_layer = {r["label"]: r["per_layer"] for r in runs if r["scope"] == "all"
                 and abs(r["target"] - 0.4) < 1e-9 and r["label"] in
                 ("quantile", "quantile-ema (NNCF rule)", "mode-median", "norm", "fat",
                  "pplp (CETT, matched)", "attr-gxo", "quantile + alloc")}
    plot_activation_ratio(per_layer, out / "sparsity_per_layer.png",
                          title=f"{result['model']}: activation ratio per layer, target 40% (all "
                                "projections), measured on held-out text")
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        if r["scope"] == "all" and r["ppl"] is not None and math.isfinite(r["ppl"]):
            curves.setdefault(r["label"], []).append((r["weighted_sparsity"], r["ppl"]))
    plot_ppl_vs_sparsity(curves, out / "ppl_vs_sparsity.png", dense_ppl=runs[0]["dense_ppl"],
                         title=f"{result['model']}: perplexity vs sparsity (all projections)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="random tiny Llama (smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--replot", action="store_true", help="redraw from methods.json")
    ap.add_argument("--refined", action="store_true",
                    help="add quantile/mode with one sparse-aware refinement to methods.json")
    ap.add_argument("--pplp-p", type=float, nargs="*", default=[],
                    help="with --refined: also PPL-p%% plans for these p")
    ap.add_argument("--parts", nargs="*", default=["all", "mlp"], choices=["all", "mlp"],
                    help="with --refined: which refined rows to (re)generate")
    ap.add_argument("--calib-windows", type=int, default=32,
                    help="calibration windows of 256 Lee tokens")
    ap.add_argument("--first-windows", action="store_true",
                    help="calibrate on the first windows of Lee, not on "
                         "windows spread over the corpus")
    args = ap.parse_args()
    out = args.out or (OUT if not args.tiny else Path("/tmp/fxsparse_methods_tiny"))
    torch.set_num_threads(1)
    if args.replot:
        result = json.loads((out / "methods.json").read_text())
    elif args.refined:
        result = run_refined(args.tiny, out, tuple(args.pplp_p), tuple(args.parts),
                             args.calib_windows, not args.first_windows)
    else:
        result = run(args.tiny, out, args.calib_windows, not args.first_windows)
    (out / "methods_table.md").write_text(table(result))
    plots(result, out)
    print(table(result))


if __name__ == "__main__":
    main()
