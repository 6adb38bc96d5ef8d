"""Probe: speculative L2 prefetch of each K-split's first weight rows, issued at launch.

Session 13 left the one-row stream 4.0-4.6 µs at τ = ∞ and found neither the split-K epilogue
nor load balance to be the cost: what remains is the chain before the first weight load (x,
mask, scan, compaction scratch, ids), during which DRAM idles. Weights do not depend on x, so a
program can ask for the first ``P`` rows of its split (its N-block's 4 KB of each) before it
knows which are kept, with a prefetch hint that holds no registers (``_prefetch_head``); the
loop's loads of the kept ones then hit L2. Counting: ~1.5 µs of idle DRAM at 4.2 TB/s is ~6 MB,
~48 KB per program, i.e. ~12 rows. Predicted: s = 0 about 1-1.5 µs faster on every shape (the
first P rows arrive during the prologue), s = 0.5 about half that, s = 0.9 and τ = ∞ flat or a
little slower (nine in ten prefetched rows are dropped; their bytes may spill past the window).

Variants: ``pfP`` (P rows, one ``prefetch.global.L2`` per 128 bytes), ``pf16b`` (256-byte
``cp.async.bulk.prefetch.L2`` requests), the accumulating form (``accum``, what compiled decode
runs) with and without ``pf16``, and two rows.

    PYTHONPATH=. python bench/probe/gemv_head.py [--out DIR] [--shapes 4096x4096 ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))
import gemv as gb  # noqa: E402

from fxsparse.kernels import sparse_gemv as sg  # noqa: E402
from fxsparse.kernels.timing import gpu_environment  # noqa: E402

SPARSITIES = (0.0, 0.5, 0.9, math.inf)


def check(out: torch.Tensor, x: torch.Tensor, thr: float, w: torch.Tensor) -> float:
    ref = F.linear(torch.where(x.float().abs() < thr, 0.0, x.float()), w.float())
    return gb.rel_err(out.float(), ref)


def run_variant(st: gb.Setup, inputs, cfg, accumulate: bool) -> tuple[float, float]:
    n = st.n
    bufs = {}

    def call(x, w, thr):
        if not accumulate:
            return sg.threshold_gemv(x, w, None, thr, config=cfg)
        buf = bufs.setdefault(w.data_ptr(), torch.zeros(x.shape[0], n, device="cuda"))
        sg.threshold_gemv_group(x, [w], [None], thr, config=cfg, accumulate=buf)
        return buf

    x, thr, _, _ = inputs[0]
    if accumulate:
        buf = torch.zeros(x.shape[0], n, device="cuda")
        sg.threshold_gemv_group(x, [st.w_cm[0]], [None], thr, config=cfg, accumulate=buf)
        err = check(buf, x, thr, st.w_cm[0])
    else:
        err = check(call(x, st.w_cm[0], thr), x, thr, st.w_cm[0])
    pairs = gb.cycle(list(zip(inputs, st.w_cm, strict=True)))
    us = gb.time_graph([lambda i=i, w=w: call(i[0], w, i[1]) for i, w in pairs])[0]
    return us, err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in gb.SHAPES])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args()
    env = gpu_environment()
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        st = gb.make_setup(n, k)
        for rows in args.rows:
            dense = gb.time_dense(st, rows)
            pick = functools.partial(sg._pick_config, rows, n, k, 2, nsm, deterministic=False)
            variants = {"default": (pick(), False), "pf16": (pick(prefetch=16), False)}
            if rows == 1:
                variants.update({
                    "pf4": (pick(prefetch=4), False), "pf8": (pick(prefetch=8), False),
                    "pf32": (pick(prefetch=32), False),
                    "pf16b": (pick(prefetch=16, prefetch_bytes=256), False),
                    "accum": (pick(accumulate=True), True),
                    "accum pf16": (pick(accumulate=True, prefetch=16), True)})
            for s in SPARSITIES:
                inputs = gb.sparse_inputs(st, rows, min(s, 1.0))  # 1: τ = ∞
                su = sum(i[3] for i in inputs) / len(inputs)
                for name, (cfg, acc) in variants.items():
                    us, err = run_variant(st, inputs, cfg, acc)
                    results.append(dict(n=n, k=k, rows=rows, s=s, s_union=su, variant=name, us=us,
                                        err=err, dense_us=dense, speedup=dense / us))
                    flag = "" if err < 1e-2 else "  !!!! WRONG RESULT"
                    print(f"{n}x{k} r{rows} s={s:<4} {name:11s} {us:8.2f} us x{dense / us:5.2f} "
                          f"err {err:.1e}{flag}", flush=True)
        del st
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_head.json").write_text(json.dumps(dict(env=env, results=results), indent=1))
    names = list(dict.fromkeys(r["variant"] for r in results))
    lines = [f"# Speculative head prefetch ({env.get('gpu')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')})", "",
             "µs per call, CUDA-graph medians, weights rotated; s = 0 / 0.5 / 0.9 / τ = ∞ per cell.", "",
             "| N x K | rows | dense µs | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for (n, k, rows) in dict.fromkeys((r["n"], r["k"], r["rows"]) for r in results):
        rs = [r for r in results if (r["n"], r["k"], r["rows"]) == (n, k, rows)]
        cells = []
        for name in names:
            v = [f"{r['us']:.2f}" for s in SPARSITIES for r in rs if r["variant"] == name and r["s"] == s]
            cells.append(" / ".join(v) if v else "-")
        lines.append(f"| {n}x{k} | {rows} | {rs[0]['dense_us']:.1f} | " + " | ".join(cells) + " |")
    (out / "gemv_head.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
