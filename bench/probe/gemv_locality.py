"""Does the GEMV's weight loop slow down because the kept rows are scattered?

Same kept count, different placement of the kept input channels:
  * ``random``: every channel kept independently (what real activations look like);
  * ``runsL``: kept channels in aligned runs of L (a tile of 16 kept rows spans L/16 runs);
  * ``random-1copy``: random, but one weight instead of a rotation of many (same bytes per call,
    much smaller footprint: what TLB reach sees, not what L2 sees, for weights above 50 MB).
If ``runs256`` is much faster than ``random`` at the same kept count, address locality (DRAM
pages, TLB reach) limits the loop, not latency or the number of tiles in flight.

    PYTHONPATH=. python bench/probe/gemv_locality.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fxsparse.kernels import sparse_gemv as sg
from fxsparse.kernels.timing import gpu_environment, time_calls

SHAPES = [(14336, 4096), (4096, 14336), (28672, 8192)]  # all larger than L2


def pattern_input(k: int, keep_frac: float, run: int, gen: torch.Generator) -> torch.Tensor:
    """x with |x| >= 2 on the kept channels (runs of ``run``), |x| < 0.5 elsewhere."""
    n_runs = math.ceil(k / run)
    kept_runs = torch.rand(n_runs, generator=gen) < keep_frac
    keep = kept_runs.repeat_interleave(run)[:k]
    x = torch.rand(k, generator=gen) * 0.5
    x[keep] += 2.0
    sign = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0)
    return (x * sign).to(torch.bfloat16).view(1, k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = gpu_environment()
    print(env, flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in SHAPES:
        copies = max(4, math.ceil(1.5e9 / (n * k * 2)))
        ws = [(torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * k**-0.5).t() for _ in range(copies)]
        for s in (0.5, 0.9):
            for name, run, n_w in [
                ("random", 1, copies),
                ("runs16", 16, copies),
                ("runs256", 256, copies),
                ("random-1copy", 1, 1),
            ]:
                xs = [pattern_input(k, 1 - s, run, gen).cuda() for _ in range(max(16, copies))]
                kept = sum(float((x.float().abs() >= 1.0).float().mean()) for x in xs) / len(xs)
                pairs = [(xs[i], ws[i % n_w]) for i in range(max(16, copies))]
                x0, w0 = pairs[0]
                ref = F.linear(torch.where(x0.float().abs() < 1.0, 0.0, x0.float()), w0.float())
                err = float((sg.threshold_gemv(x0, w0, None, 1.0).float() - ref).norm() / ref.norm())
                assert err < 1e-2, (n, k, name, err)
                us = time_calls(
                    [lambda x=x, w=w: sg.threshold_gemv(x, w, None, 1.0) for x, w in pairs],
                    5,
                    10.0,
                    graphs=True,
                )[0]
                rows.append(dict(n=n, k=k, s=s, pattern=name, kept=kept, us=us))
                print(f"{n}x{k} s={s} {name:14s} kept {kept:.3f}  {us:7.1f} us", flush=True)
        del ws
        torch.cuda.empty_cache()
    lines = [
        f"# GEMV kept-row placement ({env['gpu']}, torch {env['torch']}, triton {env['triton']})",
        "",
        "| N x K | s | " + " | ".join(p for p in dict.fromkeys(r["pattern"] for r in rows)) + " |",
        "|---|---|" + "---|" * len(dict.fromkeys(r["pattern"] for r in rows)),
    ]
    for n, k, s in dict.fromkeys((r["n"], r["k"], r["s"]) for r in rows):
        cells = [f"{r['us']:.1f}" for r in rows if (r["n"], r["k"], r["s"]) == (n, k, s)]
        lines.append(f"| {n}x{k} | {s} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gemv_locality_h100.json").write_text(
            json.dumps(dict(env=env, rows=rows), indent=1)
        )
        (Path(args.out) / "gemv_locality_h100.md").write_text(md)


if __name__ == "__main__":
    main()
