"""Probe: where the one-row stream's fixed cost goes, by ablation (results wrong on purpose).

τ = ∞ costs 4.0-4.6 µs on every benchmark shape (session 13). Variants of the default launch,
each with one part removed (``GemvConfig.ablate``, probe only): ``a1`` no phase 1 (no x load,
mask, scan or scratch; the compiler then drops the weight loop too, so only at τ = ∞), ``a2``
no split-K epilogue (no atomics, counter, reload or store), ``a4`` the arrival chain without the
float32 atomics, ``a3`` neither phase 1 nor epilogue; ``empty``: an empty kernel on the grid.

    PYTHONPATH=. python bench/probe/gemv_ablate.py [--out DIR] [--shapes 4096x4096 ...]
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
        cfgs = {a: sg._pick_config(1, n, k, 2, nsm, deterministic=False, ablate=a) for a in (0, 1, 2, 3, 4)}
        grid = math.ceil(n / cfgs[0].block_n) * cfgs[0].split_k
        empty = gb.time_empty(grid)
        results.append(dict(n=n, k=k, s=math.inf, variant="empty", us=empty, dense_us=dense))
        for s in SPARSITIES:
            inputs = gb.sparse_inputs(st, 1, min(s, 1.0))  # 1: τ = ∞
            pairs = gb.cycle(list(zip(inputs, st.w_cm, strict=True)))
            for a, cfg in cfgs.items():
                if a in (1, 3) and s < 1:
                    continue
                name = f"a{a}" if a else "default"
                us = gb.time_graph([lambda i=i, w=w, c=cfg: sg.threshold_gemv(i[0], w, None, i[1], config=c)
                                    for i, w in pairs])[0]
                results.append(dict(n=n, k=k, s=s, variant=name, us=us, dense_us=dense))
                print(f"{n}x{k} s={s:<4} {name:8s} {us:8.2f} us  (grid {grid}, empty {empty:.2f})",
                      flush=True)
        del st
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_ablate.json").write_text(json.dumps(dict(env=env, results=results), indent=1))
    names = list(dict.fromkeys(r["variant"] for r in results))
    lines = [f"# Fixed-cost ablations, one row ({env.get('gpu')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')})", "",
             "µs per call, CUDA-graph medians; s = 0 / 0.5 / 0.9 / τ = ∞ per cell (one value: τ = ∞).",
             "", "| N x K | dense µs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (n, k) in dict.fromkeys((r["n"], r["k"]) for r in results):
        rs = [r for r in results if (r["n"], r["k"]) == (n, k)]
        cells = [" / ".join(f"{r['us']:.2f}" for r in rs if r["variant"] == name) for name in names]
        lines.append(f"| {n}x{k} | {rs[0]['dense_us']:.1f} | " + " | ".join(cells) + " |")
    (out / "gemv_ablate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
