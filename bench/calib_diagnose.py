"""How close does each layer get to its target on held-out text, and why not closer?

Eager hooks only (no Dynamo). Calibrates quantile / mode-median plans on Lee windows, refines
them, and measures the achieved sparsity per layer (and per position in the window) on the
calibration windows themselves, on held-out Lee windows and on enwiki windows; per layer the
standard error over windows is recorded, so calibration noise and text shift can be told apart
(docs/calibration.md). One dense pass serves every method and target.

    nice -n 5 python bench/calib_diagnose.py --out /tmp/diag.json --calib 8 32 \
        --methods quantile --all-steps
    OMP_NUM_THREADS=1 nice -n 5 python bench/calib_diagnose.py --out /tmp/c128.json \
        --calib 128 --spread-calib --held -1 --held-max 64 --eval 0 --eval-spread 128 \
        --refine 1 --calib-measure 32 --targets 0.3 0.4 0.5 --methods quantile

The second (~42 min on 2 cores) made bench/results/calib_shift_cpu.txt, with ``--refine 2``
(two fixed-point steps) and ``--refine-windows 128`` without ``--held-max`` (refine on 128 Lee
windows disjoint from the calibration ones; held-out Lee is then the other 39) as variants.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fxsparse.kernels import keep_mask_reference  # noqa: E402
from fxsparse.methods import MethodStatistics, ObserverGroup, plan_from_observers  # noqa: E402
from fxsparse.observers import ActivationObserver  # noqa: E402
from fxsparse.plan import SparsityPlan, linear_layers  # noqa: E402
from fxsparse.reference import plan_hooks  # noqa: E402


class PosProbe(torch.nn.Module):
    """Dropped count per position of the window and per window (threshold op, as the plan
    applies it)."""

    def __init__(self, lp, seq):
        super().__init__()
        self.lp = lp
        self.c, self.s = lp.center_tensor(), lp.scale_tensor()
        self.dropped = torch.zeros(seq, dtype=torch.float64)
        self.n = torch.zeros(seq, dtype=torch.float64)
        self.per_window: list[float] = []

    def forward(self, x):
        keep = keep_mask_reference(x, self.lp.threshold, self.c, self.s)  # [B, T, F]
        drop = (~keep).double().reshape(-1, x.shape[-2], x.shape[-1]).sum(-1)  # [B, T]
        self.dropped[: drop.shape[1]] += drop.sum(0)
        self.n[: drop.shape[1]] += x.shape[-1] * drop.shape[0]
        self.per_window += (drop.sum(1) / drop[0].numel() / x.shape[-1]).tolist()
        return x


@torch.no_grad()
def observe(model, windows, names, plan=None):
    linears = linear_layers(model)
    groups = {n: ObserverGroup({"plain": ActivationObserver(n, linears[n][1])}) for n in names}
    with ExitStack() as st:
        if plan is None:
            mods = dict(model.named_modules())
            hs = [mods[n].register_forward_pre_hook(lambda m, a, n=n: groups[n](a[0]))
                  for n in names]
            st.callback(lambda: [h.remove() for h in hs])
        else:
            st.enter_context(plan_hooks(model, plan, groups))
        for w in windows:
            model(w, use_cache=False)
    return MethodStatistics(groups=groups, linears={n: linears[n] for n in names},
                            model=SparsityPlan.fingerprint(model))


@torch.no_grad()
def measure(model, windows, plan, seq):
    probes = {n: PosProbe(lp, seq) for n, lp in plan.layers.items()}
    with plan_hooks(model, plan, probes):
        for w in windows:
            model(w, use_cache=False)
    return {n: {"sparsity": float(p.dropped.sum() / p.n.sum()),
                "per_pos": (p.dropped / p.n.clamp(min=1)).tolist(),
                "per_window": p.per_window} for n, p in probes.items()}


METHOD_OPTS = {"quantile": ("quantile", {}), "mode-median": ("mode", {"center": "median"}),
               "mode-kde": ("mode", {"center": "kde"}), "mode-zero": ("mode", {"center": "zero"})}


def calibrate(model, windows, names, target, method, opts, refine, stats=None,
              refine_windows=None):
    """Plans after 0..refine refinement steps. ``stats``: dense statistics of ``windows``
    already observed (one pass serves every method and target); ``refine_windows``: refine on
    these windows instead of ``windows`` (held-out refinement)."""
    stats = observe(model, windows, names) if stats is None else stats
    plan = plan_from_observers(stats, dict.fromkeys(names, target), method, **opts)
    plans = [plan]
    for _ in range(refine):
        stats = observe(model, windows if refine_windows is None else refine_windows, names, plan)
        plan = plan_from_observers(stats, dict.fromkeys(names, target), method, **opts)
        plans.append(plan)
    return plans


def summarize(m, target):
    """Deviation from the target per layer, worst layer, o_proj mean / max, and the standard
    error of each layer's sparsity over windows (sampling noise of that evaluation set)."""
    dev = {n: v["sparsity"] - target for n, v in m.items()}
    worst = max(dev, key=lambda n: abs(dev[n]))
    se = {}
    for n, v in m.items():
        w = torch.tensor(v["per_window"], dtype=torch.float64)
        se[n] = float(w.std() / w.numel() ** 0.5) if w.numel() > 1 else 0.0
    oproj = [dev[n] for n in dev if "o_proj" in n]
    return {"per_layer": {n: v["sparsity"] for n, v in m.items()},
            "per_pos": {n: v["per_pos"] for n, v in m.items()
                        if "o_proj" in n or "down_proj" in n},
            "per_window": {n: [round(x, 5) for x in v["per_window"]] for n, v in m.items()
                           if "o_proj" in n},
            "se": se, "worst": worst, "worst_dev": dev[worst],
            "oproj_mean_dev": sum(oproj) / len(oproj), "oproj_max_abs_dev": max(map(abs, oproj)),
            "mean_dev": sum(dev.values()) / len(dev)}


def spread_idx(pool, n):
    """n indices evenly spaced over the sorted list ``pool``."""
    pool = sorted(pool)
    n = min(n, len(pool))
    return [pool[i * len(pool) // n] for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--calib", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--held", type=int, default=16,
                    help="held-out Lee windows (from the end); -1: with --spread-calib, every Lee "
                         "window used neither for calibration nor for refinement")
    ap.add_argument("--held-max", type=int, default=None,
                    help="with --held -1, at most this many of those windows (spread)")
    ap.add_argument("--eval", type=int, default=8, help="enwiki windows (the first ones)")
    ap.add_argument("--eval-spread", type=int, default=0,
                    help="also measure on this many enwiki windows spread evenly over the dump")
    ap.add_argument("--refine", type=int, default=2)
    ap.add_argument("--refine-windows", type=int, default=0,
                    help="refine on this many Lee windows disjoint from the calibration ones "
                         "(spread over the rest; held-out refinement), else on the calibration "
                         "windows themselves")
    ap.add_argument("--calib-measure", type=int, default=None,
                    help="measure on only this many of the calibration windows (spread)")
    ap.add_argument("--all-steps", action="store_true",
                    help="measure the plan of every refinement step, not only the last")
    ap.add_argument("--spread-calib", action="store_true",
                    help="calibration windows spread evenly over Lee (else the first ones)")
    ap.add_argument("--save-plans", type=Path, default=None)
    ap.add_argument("--load-plans", type=Path, nargs="*", default=[],
                    help="only measure these plans")
    ap.add_argument("--spread", type=int, default=0,
                    help="also measure on this many blocks of 8 enwiki windows spread over it")
    ap.add_argument("--targets", type=float, nargs="*", default=[0.4])
    ap.add_argument("--methods", nargs="*", default=["quantile", "mode-median"],
                    choices=sorted(METHOD_OPTS))
    ap.add_argument("--bos", action="store_true", help="prepend BOS to every window")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    from fxsparse.data import enwiki_text, lee_text, load_model

    t0 = time.perf_counter()
    model, tok = load_model()
    names = [n for n in linear_layers(model) if n.endswith("_proj")]
    lee = tok(lee_text(), return_tensors="pt").input_ids[0]
    en = tok(enwiki_text(), return_tensors="pt").input_ids[0]
    seq = args.seq
    print(f"loaded in {time.perf_counter() - t0:.0f}s; lee {lee.numel()} tokens, enwiki "
          f"{en.numel()}; bos {tok.bos_token!r} id {tok.bos_token_id}; first lee ids "
          f"{lee[:5].tolist()}", flush=True)

    def wins(ids, idx):
        out = []
        for i in idx:
            w = ids[i * seq:(i + 1) * seq]
            if args.bos:
                w = torch.cat([torch.tensor([tok.bos_token_id]), w[:-1]])
            out.append(w.unsqueeze(0))
        return out

    n_lee = lee.numel() // seq
    n_en = en.numel() // seq
    evals = {"enwiki": wins(en, range(args.eval))} if args.eval else {}
    if args.eval_spread:
        evals[f"enwiki_spread{args.eval_spread}"] = wins(en, spread_idx(range(n_en),
                                                                        args.eval_spread))
    for k in range(args.spread):  # more enwiki: k-th block of 8 windows, spread over the text
        start = (k + 1) * n_en // (args.spread + 1)
        evals[f"enwiki@{start}"] = wins(en, range(start, start + 8))
    held_last = args.held >= 0
    if held_last:
        evals = {"lee_held": wins(lee, range(n_lee - args.held, n_lee)), **evals}
    res = {"n_lee_windows": n_lee, "n_enwiki_windows": n_en, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": []}
    for path in args.load_plans:
        plan = SparsityPlan.load(path, model)
        target = next(iter(plan.layers.values())).target_sparsity
        for sname, ws in evals.items():
            r = summarize(measure(model, ws, plan, seq), target)
            res["runs"].append({"plan": str(path), "set": sname, **r})
            print(f"{path.name} on {sname:12s}: worst {r['worst'].replace('model.layers.', '')} "
                  f"{r['worst_dev']:+.4f}; o_proj max |dev| {r['oproj_max_abs_dev']:.4f} mean "
                  f"{r['oproj_mean_dev']:+.4f}", flush=True)
        args.out.write_text(json.dumps(res))
    if args.load_plans:
        return
    for nc in args.calib:
        avail = n_lee - max(args.held, 0)  # calibration windows never overlap the held-out ones
        cidx = spread_idx(range(avail), nc) if args.spread_calib else list(range(nc))
        assert len(cidx) == nc, f"only {avail} Lee windows for calibration"
        ridx = (spread_idx(sorted(set(range(avail)) - set(cidx)), args.refine_windows)
                if args.refine_windows else [])
        assert len(ridx) == args.refine_windows, "not enough Lee windows to refine on"
        calib, refine_ws = wins(lee, cidx), wins(lee, ridx) if ridx else None
        sets = dict(evals)
        if not held_last:
            rest = sorted(set(range(n_lee)) - set(cidx) - set(ridx))
            rest = spread_idx(rest, args.held_max or len(rest))
            sets = {"lee_held": wins(lee, rest), **sets}
        meas_c = (calib if args.calib_measure is None
                  else [calib[i] for i in spread_idx(range(nc), args.calib_measure)])
        print(f"calibration {nc} Lee windows, refine on "
              f"{len(ridx) if ridx else 'the same'} windows; evaluation sets "
              f"{ {k: len(v) for k, v in sets.items()} }", flush=True)
        t = time.perf_counter()
        dense = observe(model, calib, names)
        print(f"dense statistics in {time.perf_counter() - t:.0f}s", flush=True)
        for label in args.methods:
            method, opts = METHOD_OPTS[label]
            for target in args.targets:
                t = time.perf_counter()
                plans = calibrate(model, calib, names, target, method, opts, args.refine,
                                  stats=dense, refine_windows=refine_ws)
                t_cal = time.perf_counter() - t
                tag = f"{label}_c{nc}_r{args.refine}" + (f"h{len(ridx)}" if ridx else "")
                if args.save_plans:
                    plans[-1].save(args.save_plans / f"{tag}_t{target:g}.json")
                for it, plan in enumerate(plans):
                    if it != len(plans) - 1 and not args.all_steps:
                        continue
                    run = {"method": label, "calib_windows": nc, "refine": it,
                           "refine_windows": len(ridx) or "same", "target": target,
                           "calib_seconds": t_cal, "sets": {}}
                    todo = dict(sets)
                    if it == len(plans) - 1:
                        todo = {"calib": meas_c, **({"refine_set": [refine_ws[i] for i in spread_idx(
                            range(len(ridx)), len(meas_c))]} if ridx else {}),
                                **todo}
                    for sname, ws in todo.items():
                        r = summarize(measure(model, ws, plan, seq), target)
                        run["sets"][sname] = r
                        print(f"{label:11s} t={target:g} calib {nc:3d} refine {it} "
                              f"[{len(ridx) or 'same'}] on {sname:16s}: worst "
                              f"{r['worst'].replace('model.layers.', '')} {r['worst_dev']:+.4f}; "
                              f"o_proj max|dev| {r['oproj_max_abs_dev']:.4f} mean "
                              f"{r['oproj_mean_dev']:+.4f}; all mean {r['mean_dev']:+.4f} "
                              f"[{time.perf_counter() - t:.0f}s]", flush=True)
                    run["seconds"] = time.perf_counter() - t
                    res["runs"].append(run)
                    args.out.write_text(json.dumps(res))


if __name__ == "__main__":
    main()
