"""Probe: what load balance, the epilogue and the grid cost the one-row kernel; several rows.

The stream rule leaves 5-7 µs per call above the bytes (H200: 14336x4096 at s = 0.5 runs 20.0 µs
where 58.7 MB take 13.7 µs at cuBLAS's 4.3 TB/s). Three candidates, each measured by a variant
that removes it alone, on the same weights in one run:

* **balance**: a K-split's kept count is binomial (4096²: 64-channel splits, 32 ± 4 kept at
  s = 0.5, so the heaviest of 64 splits reads ~30% more than the mean). ``regular`` masks keep
  exactly the same count in every window of channels (a low-discrepancy pattern), same sparsity.
* **epilogue**: ``accum`` adds the partials into a float32 output and stops (no fence, counter,
  reload or rounding store).
* **grid**: ``pps2`` two programs per SM; ``pdl`` programmatic dependent launch back to back;
  ``runs2KB`` / ``runs1KB`` narrower N-blocks, hence longer K-splits whose kept counts vary
  less (4096²: 64-channel splits at 4 KB runs, 128 at 2 KB, 256 at 1 KB).

Its table, ``bench/results/gemv_balance_h200.md``, also holds three variants that lost and whose
kernel options were removed: ``early`` (the last split finishing without its own atomics),
``balance`` (splits by kept count) and ``wave`` (no more programs than SMs).

Several rows (rows = 4, against the op's mask kernel + cuBLAS and plain cuBLAS): the
row-generic tensor-core kernel with long runs (512-2048 columns per program, 1-2 programs per
SM), and the one-row kernel's stream with [4, ...] masks (``row_kernel=True``): FMA
accumulators (``stream``; sm_90: 128-140 registers, 398 instructions per warp per 16 KB tile,
the one-row loop 216) or tensor cores (``dot``: [16, 16] x [16, 1024] tiles, 148-171 registers,
205-212 instructions per 32 KB tile).

    PYTHONPATH=. python bench/probe/gemv_balance.py [--out DIR] [--shapes 4096x4096 ...]
"""

from __future__ import annotations

import argparse
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

DT = torch.bfloat16
PHI = (math.sqrt(5) - 1) / 2


def regular_inputs(st: gb.Setup, rows: int, s: float) -> list:
    """x whose kept channels follow a golden-ratio sequence: every window of m channels keeps
    m (1 - s) ± 1 of them; threshold 1 (kept |x| >= 1.5, dropped |x| <= ~1)."""
    out = []
    i = torch.arange(st.k, device="cuda", dtype=torch.float64)
    for c in range(len(st.w_cm)):
        xs = []
        for r in range(rows):
            keep = torch.frac((i + 7.0 * (c * rows + r)) * PHI) >= s
            mag = torch.where(keep, 1.5 + torch.randn(st.k, device="cuda").abs(),
                              0.2 * torch.randn(st.k, device="cuda").clamp(-4.5, 4.5))
            xs.append(mag * torch.where(torch.rand(st.k, device="cuda") < 0.5, -1.0, 1.0))
        x = torch.stack(xs).to(DT)
        keep = ~(x.float().abs() < 1.0)
        out.append((x, 1.0, 1 - keep.float().mean().item(), 1 - keep.any(0).float().mean().item()))
    return out


def check(out: torch.Tensor, x: torch.Tensor, thr: float, w: torch.Tensor) -> float:
    ref = F.linear(torch.where(x.float().abs() < thr, 0.0, x.float()), w.float())
    return gb.rel_err(out.float(), ref)


def time_fn(st: gb.Setup, inputs, fn) -> tuple[float, float]:
    x, thr, _, _ = inputs[0]
    e = check(fn(x, st.w_cm[0], thr), x, thr, st.w_cm[0])
    pairs = gb.cycle(list(zip(inputs, st.w_cm, strict=True)))
    us = gb.time_graph([lambda i=i, w=w: fn(i[0], w, i[1]) for i, w in pairs])[0]
    return us, e


def kernel(cfg):
    return lambda x, w, thr: sg.threshold_gemv(x, w, None, thr, config=cfg)


def one_row(st: gb.Setup, nsm: int, dense: float, record) -> None:
    n, k = st.n, st.k
    configs = {
        "default": sg._pick_config(1, n, k, 2, nsm),
        "pps2": sg._pick_config(1, n, k, 2, nsm, programs_per_sm=2),
        "pdl": sg._pick_config(1, n, k, 2, nsm, pdl=True),
        "runs2KB": sg._pick_config(1, n, k, 2, nsm, block_n=1024),  # longer splits: less binomial spread
        "runs1KB": sg._pick_config(1, n, k, 2, nsm, block_n=512),
    }
    acc_bufs = {}

    def accum(x, w, thr):  # float32 sums, no epilogue: the graph's accumulating form
        buf = acc_bufs.setdefault(w.data_ptr(), torch.zeros(1, w.shape[0], device="cuda"))
        sg.threshold_gemv_group(x, [w], [None], thr, accumulate=buf)
        return None

    for s in (0.0, 0.5, 0.9, math.inf):
        for mask in ("random", "regular"):
            if mask == "regular" and s in (0.0, math.inf):
                continue
            inputs = regular_inputs(st, 1, s) if mask == "regular" else gb.sparse_inputs(st, 1, min(s, 1.0))
            for name, cfg in configs.items():
                if mask == "regular" and name in ("pps2", "pdl"):
                    continue
                us, e = time_fn(st, inputs, kernel(cfg))
                record(1, s, mask, name, us, e, inputs, dense, cfg)
            if mask == "random" or s == 0.5:
                x0, thr0, _, _ = inputs[0]
                pairs = gb.cycle(list(zip(inputs, st.w_cm, strict=True)))
                buf = torch.zeros(1, n, device="cuda")
                sg.threshold_gemv_group(x0, [st.w_cm[0]], [None], thr0, accumulate=buf)
                e = check(buf, x0, thr0, st.w_cm[0])
                us = gb.time_graph([lambda i=i, w=w: accum(i[0], w, i[1]) for i, w in pairs])[0]
                acc_cfg = sg._pick_config(1, n, k, 2, nsm, accumulate=True)
                record(1, s, mask, "accum", us, e, inputs, dense, acc_cfg)


def rows4(st: gb.Setup, nsm: int, record) -> None:
    n, k, rows = st.n, st.k, 4
    dense = gb.time_dense(st, rows)
    record(rows, 0.0, "-", "cublas", dense, 0.0, None, dense, None)
    configs = {"g256x8": sg._block_config(rows, n, k, 2, nsm)}
    for bn, nw, pps in ((512, 4, 2), (512, 8, 1), (1024, 8, 1), (1024, 8, 2), (1024, 4, 2), (2048, 8, 1)):
        configs[f"g{bn}w{nw}p{pps}"] = sg._block_config(rows, n, k, 2, nsm, block_n=bn, num_warps=nw,
                                                        programs_per_sm=pps, scratch_group=1)
    stream = dict(row_kernel=True, deterministic=False)  # the one-row kernel's stream, four rows
    configs["stream"] = sg._pick_config(rows, n, k, 2, nsm, **stream)
    configs["stream pps2"] = sg._pick_config(rows, n, k, 2, nsm, **stream, programs_per_sm=2)
    configs["stream 2KB"] = sg._pick_config(rows, n, k, 2, nsm, **stream, block_n=1024)
    dot = dict(stream, row_dot=True, block_n=1024)  # tensor cores: [16, SUB_K=16] x [16, 1024] tiles
    configs["dot"] = sg._pick_config(rows, n, k, 2, nsm, **dot)
    configs["dot 4KB st3"] = sg._pick_config(rows, n, k, 2, nsm, **dict(dot, block_n=2048), stages=3)
    for s in (0.0, 0.5, 0.8, 0.9):
        inputs = gb.sparse_inputs(st, rows, s)
        us, e = time_fn(st, inputs, lambda x, w, thr: F.linear(sg.masked_input(x, thr), w))
        record(rows, s, "random", "mask+cublas", us, e, inputs, dense, None)
        for name, cfg in configs.items():
            try:
                us, e = time_fn(st, inputs, kernel(cfg))
            except Exception as ex:  # noqa: BLE001  (a variant that does not compile)
                print(f"  {name}: {type(ex).__name__}: {str(ex)[:160]}", flush=True)
                continue
            record(rows, s, "random", name, us, e, inputs, dense, cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in gb.SHAPES])
    ap.add_argument("--parts", nargs="+", default=["row1", "rows4"])
    args = ap.parse_args()
    env = gpu_environment()
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    results = []

    def record(rows, s, mask, name, us, err, inputs, dense, cfg):
        su = sum(i[3] for i in inputs) / len(inputs) if inputs else 0.0
        grid = None if cfg is None else math.ceil(n / cfg.block_n) * cfg.split_k
        results.append(dict(n=n, k=k, rows=rows, s=s, mask=mask, variant=name, us=us, err=err,
                            s_union=su, dense_us=dense, speedup=dense / us, programs=grid))
        print(f"{n}x{k} r{rows} s={s:<4} {mask:8s} {name:12s} {us:8.2f} us x{dense / us:5.2f} "
              f"err {err:.1e} grid {grid}", flush=True)
        if not err < 1e-2:
            print("!!!! WRONG RESULT", flush=True)

    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        st = gb.make_setup(n, k)
        if "row1" in args.parts:
            one_row(st, nsm, gb.time_dense(st, 1), record)
        if "rows4" in args.parts:
            rows4(st, nsm, record)
        del st
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_balance.json").write_text(json.dumps(dict(env=env, results=results), indent=1))
    lines = [f"# Balance / epilogue / grid probe ({env.get('gpu')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')})", "",
             "| N x K | rows | s | mask | variant | µs | x dense | grid |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['n']}x{r['k']} | {r['rows']} | {r['s']} | {r['mask']} | {r['variant']} | "
                     f"{r['us']:.2f} | {r['speedup']:.2f} | {r['programs']} |")
    (out / "gemv_balance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
