"""Why does refined quantile calibration miss o_proj targets on held-out text? (issue 4)

Eager hooks only (no Dynamo). Calibrates quantile / mode-median plans on Lee windows, refines
them, and measures the achieved sparsity per layer (and per position in the window) on the
calibration windows themselves, on held-out Lee windows and on enwiki windows.

The runs behind bench/NOTES.md (calibration section; ~20 + ~10 min on a shared 2-core box):

    nice -n 5 python bench/calib_diagnose.py --out /tmp/diag.json --calib 8 32 \
        --methods quantile --all-steps
    nice -n 5 python bench/calib_diagnose.py --out /tmp/diag_spread.json --calib 32 \
        --spread-calib --refine 1 --spread 3 --methods quantile

(the first was run before ``--all-steps`` existed, measuring steps 0, 1 and 2 as it now does.)
"""

from __future__ import annotations

import argparse
import json
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
    """Dropped count per position of the window (threshold op, as the plan applies it)."""

    def __init__(self, lp, seq):
        super().__init__()
        self.lp = lp
        self.c, self.s = lp.center_tensor(), lp.scale_tensor()
        self.dropped = torch.zeros(seq, dtype=torch.float64)
        self.n = torch.zeros(seq, dtype=torch.float64)

    def forward(self, x):
        keep = keep_mask_reference(x, self.lp.threshold, self.c, self.s)  # [1, T, F]
        d = (~keep).double().sum(-1).reshape(-1, x.shape[-2]).sum(0)
        self.dropped[: d.numel()] += d
        self.n[: d.numel()] += x.shape[-1] * x.reshape(-1, x.shape[-2], x.shape[-1]).shape[0]
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
                "per_pos": (p.dropped / p.n.clamp(min=1)).tolist()} for n, p in probes.items()}


def calibrate(model, windows, names, target, method, opts, refine):
    stats = observe(model, windows, names)
    plan = plan_from_observers(stats, dict.fromkeys(names, target), method, **opts)
    plans = [plan]
    for _ in range(refine):
        stats = observe(model, windows, names, plan)
        plan = plan_from_observers(stats, dict.fromkeys(names, target), method, **opts)
        plans.append(plan)
    return plans


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--calib", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--held", type=int, default=16, help="held-out Lee windows (from the end)")
    ap.add_argument("--eval", type=int, default=8, help="enwiki windows")
    ap.add_argument("--refine", type=int, default=2)
    ap.add_argument("--all-steps", action="store_true",
                    help="measure the plan of every refinement step, not only the last")
    ap.add_argument("--spread-calib", action="store_true",
                    help="calibration windows spread evenly over Lee (else the first ones)")
    ap.add_argument("--save-plans", type=Path, default=None)
    ap.add_argument("--load-plans", type=Path, nargs="*", default=[],
                    help="only measure these plans")
    ap.add_argument("--spread", type=int, default=0,
                    help="also measure on this many blocks of 8 enwiki windows spread over it")
    ap.add_argument("--target", type=float, default=0.4)
    ap.add_argument("--methods", nargs="*", default=["quantile", "mode-median"])
    ap.add_argument("--bos", action="store_true", help="prepend BOS to every window")
    args = ap.parse_args()
    torch.set_num_threads(2)
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
    held = wins(lee, range(n_lee - args.held, n_lee))
    evals = {"lee_held": held, "enwiki": wins(en, range(args.eval))}
    n_en = en.numel() // seq
    for k in range(args.spread):  # more enwiki: k-th block of 8 windows, spread over the text
        start = (k + 1) * n_en // (args.spread + 1)
        evals[f"enwiki@{start}"] = wins(en, range(start, start + 8))
    res = {"n_lee_windows": n_lee, "runs": []}
    for path in args.load_plans:
        plan = SparsityPlan.load(path, model)
        for sname, ws in evals.items():
            m = measure(model, ws, plan, seq)
            dev = {n: v["sparsity"] - args.target for n, v in m.items()}
            worst = max(dev, key=lambda n: abs(dev[n]))
            oproj = [dev[n] for n in dev if "o_proj" in n]
            res["runs"].append({"plan": str(path), "set": sname,
                                "per_layer": {n: v["sparsity"] for n, v in m.items()}})
            print(f"{path.name} on {sname:12s}: worst {worst.replace('model.layers.', '')} "
                  f"{dev[worst]:+.4f}; o_proj max {max(oproj):+.4f} mean "
                  f"{sum(oproj) / len(oproj):+.4f}", flush=True)
        args.out.write_text(json.dumps(res))
    if args.load_plans:
        return
    for label in args.methods:
        method, opts = ("quantile", {}) if label == "quantile" else ("mode", {"center": "median"})
        for nc in args.calib:
            assert nc <= n_lee - args.held
            avail = n_lee - args.held  # calibration windows never overlap the held-out ones
            calib = wins(lee, [i * avail // nc for i in range(nc)] if args.spread_calib
                         else range(nc))
            t = time.perf_counter()
            plans = calibrate(model, calib, names, args.target, method, opts, args.refine)
            if args.save_plans:
                plans[-1].save(args.save_plans / f"{label}_c{nc}_r{args.refine}.json")
            for it, plan in enumerate(plans):
                if it != len(plans) - 1 and not args.all_steps:
                    continue
                run = {"method": label, "calib_windows": nc, "refine": it, "sets": {}}
                sets = {"calib": calib, **evals} if it == len(plans) - 1 else evals
                for sname, ws in sets.items():
                    m = measure(model, ws, plan, seq)
                    dev = {n: v["sparsity"] - args.target for n, v in m.items()}
                    worst = max(dev, key=lambda n: abs(dev[n]))
                    run["sets"][sname] = {"per_layer": {n: v["sparsity"] for n, v in m.items()},
                                          "per_pos": {n: v["per_pos"] for n, v in m.items()
                                                      if "o_proj" in n or "down_proj" in n},
                                          "worst": worst, "worst_dev": dev[worst]}
                    oproj = [dev[n] for n in dev if "o_proj" in n]
                    print(f"{label:12s} calib {nc:3d} refine {it} on {sname:9s}: worst "
                          f"{worst.replace('model.layers.', '')} {dev[worst]:+.4f}; o_proj max "
                          f"{max(oproj):+.4f} mean {sum(oproj) / len(oproj):+.4f} "
                          f"[{time.perf_counter() - t:.0f}s]", flush=True)
                res["runs"].append(run)
                args.out.write_text(json.dumps(res))


if __name__ == "__main__":
    main()
