"""Probe: the compaction scratch prefetched to L1 before phase 1 (``GemvConfig.scr_l1``).

Phase 1 scatters the kept channel ids and values to a per-program global scratch, and the
weight pipeline's first id loads (4-byte ``cp.async``, L1-allocating) read them back: an L2
round trip before the first weight load, unless the lines are already in L1 and the scatter's
stores update them there. ``scr_l1`` issues ``prefetch.global.L1`` for the program's scratch
lines before x is loaded (the two round trips overlap). Predicted: 0.3-0.5 µs less at
s = 0 / 0.5 / 0.9 if L1 keeps stored lines, nothing (or +0.1) at τ = ∞, where no id is read.
Default and variant alternate twice (A B A B) in one process; outputs are checked equal.

    PYTHONPATH=. python bench/probe/gemv_scr_l1.py [--out DIR] [--shapes 4096x4096 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import gemv as gb  # noqa: E402

from fxsparse.kernels import sparse_gemv as sg  # noqa: E402
from fxsparse.kernels.timing import gpu_environment  # noqa: E402

SPARSITIES = (0.0, 0.5, 0.9, math.inf)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in gb.SHAPES])
    args = ap.parse_args()
    env = gpu_environment()
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        st = gb.make_setup(n, k)
        dense = gb.time_dense(st, 1)
        cfgs = {v: sg._pick_config(1, n, k, 2, nsm, deterministic=False, scr_l1=v == "l1")
                for v in ("default", "l1")}
        for s in SPARSITIES:
            inputs = gb.sparse_inputs(st, 1, min(s, 1.0))
            pairs = gb.cycle(list(zip(inputs, st.w_cm, strict=True)))
            x, thr = inputs[0][0], inputs[0][1]
            outs = {v: sg.threshold_gemv(x, st.w_cm[0], None, thr, config=c) for v, c in cfgs.items()}
            err = gb.rel_err(outs["l1"], outs["default"].float())
            for rep in range(2):
                for v, cfg in cfgs.items():
                    calls = [lambda i=i, w=w, c=cfg: sg.threshold_gemv(i[0], w, None, i[1], config=c)
                             for i, w in pairs]
                    us = gb.time_graph(calls)[0]
                    results.append(dict(n=n, k=k, s=s, variant=v, rep=rep, us=us, dense_us=dense, err=err))
                    print(f"{n}x{k} s={s:<4} {v:8s} rep {rep} {us:8.2f} us  (err vs default {err:.1e})",
                          flush=True)
        del st
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_scr_l1.json").write_text(json.dumps(dict(env=env, results=results), indent=1))
    lines = [f"# Scratch prefetched to L1, one row ({env.get('gpu')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')})", "",
             "µs per call, CUDA-graph medians, two alternating repetitions (rep 0 / rep 1).", "",
             "| N x K | s | dense µs | default | l1 | l1 - default (mean) | max rel. err vs default |",
             "|---|---|---|---|---|---|---|"]
    for (n, k, s) in dict.fromkeys((r["n"], r["k"], r["s"]) for r in results):
        rs = [r for r in results if (r["n"], r["k"], r["s"]) == (n, k, s)]
        d = [r["us"] for r in rs if r["variant"] == "default"]
        v = [r["us"] for r in rs if r["variant"] == "l1"]
        lines.append(f"| {n}x{k} | {s} | {rs[0]['dense_us']:.1f} | {d[0]:.2f} / {d[1]:.2f} | "
                     f"{v[0]:.2f} / {v[1]:.2f} | {sum(v) / 2 - sum(d) / 2:+.2f} | {rs[0]['err']:.1e} |")
    (out / "gemv_scr_l1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
