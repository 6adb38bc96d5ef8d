"""What the sparse GEMV's fixed cost (τ = ∞: nothing kept) is made of, by leaving stages out.

One probe kernel on the row-generic kernel's grid (``_pick_config(row_kernel=False)``), stages added
one at a time; differences between rows are what each stage costs:
  * ``empty``: every program stores one float (launch and scheduling floor);
  * ``x``: each program loads its K-split of x and stores its sum;
  * ``x rep8``: the same, but N-block groups of 8 read their own copy of x (if this is much
    faster than ``x``, many SMs reading the same lines of x at once is what costs);
  * ``mask``: plus the keep mask and its prefix sum (no stores);
  * ``compact``: plus the scatter into the compaction scratch, a barrier and the read-back of
    the first ids (the product kernel's phase 1);
  * ``compact+epi``: plus the split-K epilogue on a zero partial (partial store, arrival
    atomic, last program's reduce and store): the product kernel at τ = ∞ less its weight loop;
  * ``product τ=∞``: ``threshold_gemv`` itself with nothing kept.

    PYTHONPATH=. python bench/probe/gemv_fixed.py [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch
import triton
import triton.language as tl

from fxsparse.kernels import sparse_gemv as sg
from fxsparse.kernels.timing import gpu_environment, gpu_tag, time_calls

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]


@triton.jit
def _probe_kernel(x_ptr, x_rep_stride, scr_ptr, ws_ptr, cnt_ptr, out_ptr, N, K, split_len, split_k,
                  scr_group, threshold, STAGE: tl.constexpr, XREP: tl.constexpr, CHUNK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, STEPS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    part = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    if STAGE >= 1:
        k_first = pid_k * split_len
        k_end = tl.minimum(K, k_first + split_len)
        xp = x_ptr + (pid_n % XREP) * x_rep_stride
        offs_r = tl.arange(0, 1)
        r_ok = offs_r < 1
        scr_row = pid_k.to(tl.int64) * tl.cdiv(tl.cdiv(N, BLOCK_N), scr_group) + pid_n // scr_group
        scr_ids = scr_ptr + scr_row * 2 * split_len
        scr_val = scr_ids + (1 + offs_r[:, None]) * split_len
        n_kept = 0
        total = 0.0
        thr = tl.cast(threshold, tl.float32)
        for ci in tl.static_range(STEPS):
            kc = k_first + ci * CHUNK_K + tl.arange(0, CHUNK_K)
            kc_ok = kc < k_end
            xc = tl.load(xp + kc[None, :], mask=kc_ok[None, :], other=0.0)
            if STAGE == 1:
                total += tl.sum(tl.sum(xc.to(tl.float32), axis=1), axis=0)
            elif STAGE == 2:
                keep, v = sg._kept_value(xc, kc, kc_ok, xp, xp, thr, 0, False)
                any_keep = tl.max((keep & kc_ok[None, :]).to(tl.int32), axis=0)
                n_kept = n_kept + tl.max(tl.cumsum(any_keep, axis=0), axis=0)
            else:
                n_kept = sg._compact(xc, kc, kc_ok, r_ok, n_kept, xp, xp, thr, scr_ids, scr_val, 0, False)
        if STAGE >= 3:
            tl.debug_barrier()
            offs_s = tl.arange(0, 16)
            ids = tl.load(scr_ids + offs_s, mask=offs_s < n_kept, other=0.0)
            total = tl.sum(ids, axis=0)
        elif STAGE == 2:
            total = n_kept.to(tl.float32)
        part += total
    if STAGE >= 4 and split_k > 1:
        ws_tile = offs_n[None, :].to(tl.int64)
        tl.store(ws_ptr + pid_k.to(tl.int64) * N + ws_tile, part, mask=n_ok[None, :])
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == split_k - 1:
            total2 = tl.zeros((1, BLOCK_N), dtype=tl.float32)
            for sp in range(0, split_k):
                total2 += tl.load(ws_ptr + sp * N + ws_tile, mask=n_ok[None, :], other=0.0,
                                  cache_modifier=".cg")
            tl.store(out_ptr + offs_n[None, :], total2, mask=n_ok[None, :])
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
    else:
        tl.store(out_ptr + pid_k * N + offs_n[None, :], part, mask=n_ok[None, :])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = gpu_environment()
    print(env, flush=True)
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for n, k in SHAPES:
        cfg = sg._pick_config(1, n, k, 2, nsm, row_kernel=False)
        n_blocks = triton.cdiv(n, cfg.block_n)
        grid = (n_blocks, cfg.split_k)
        steps = cfg.chunks_per_split if cfg.chunk_k < cfg.split_len else 1
        xs = [torch.randn(8, k, device="cuda", dtype=torch.bfloat16) for _ in range(16)]
        scr = torch.empty(cfg.split_k * triton.cdiv(n_blocks, cfg.scratch_group) * 2 * cfg.split_len,
                          device="cuda")
        ws = torch.empty(cfg.split_k * n, device="cuda")
        cnt = torch.zeros(n_blocks, dtype=torch.int32, device="cuda")
        out = torch.empty(cfg.split_k * n, device="cuda")
        row = dict(n=n, k=k, programs=n_blocks * cfg.split_k, split_k=cfg.split_k, chunk_k=cfg.chunk_k,
                   steps=steps)
        variants = [("empty", 0, 1), ("x", 1, 1), ("x rep8", 1, 8), ("mask", 2, 1), ("compact", 3, 1),
                    ("compact+epi", 4, 1)]
        launch = functools.partial(
            _probe_kernel[grid], x_rep_stride=k, scr_ptr=scr, ws_ptr=ws, cnt_ptr=cnt, out_ptr=out, N=n, K=k,
            split_len=cfg.split_len, split_k=cfg.split_k, scr_group=cfg.scratch_group, threshold=math.inf,
            CHUNK_K=cfg.chunk_k, BLOCK_N=cfg.block_n, STEPS=steps)
        for name, stage, rep in variants:
            calls = [functools.partial(launch, x, STAGE=stage, XREP=rep) for x in xs]
            row[name] = time_calls(calls, 5, 10.0, graphs=True)[0]
        wsg = [(torch.randn(k, n, device="cuda", dtype=torch.bfloat16)).t() for _ in range(2)]
        calls = [functools.partial(sg.threshold_gemv, x[:1], wsg[i % 2], None, math.inf, config=cfg)
                 for i, x in enumerate(xs)]
        row["product τ=∞"] = time_calls(calls, 5, 10.0, graphs=True)[0]
        rows.append(row)
        names = [v[0] for v in variants] + ["product τ=∞"]
        print(f"{n}x{k} ({row['programs']} programs, split {cfg.split_k}, {steps} step(s) of "
              f"{cfg.chunk_k}): " + ", ".join(f"{c} {row[c]:.2f}" for c in names), flush=True)
        del wsg
    md = [f"# GEMV fixed cost by stage on {env['gpu']} (torch {env['torch']}, triton {env['triton']})", "",
          "CUDA-graph medians, µs per launch, one row, τ = ∞ (nothing kept); see the probe's docstring.", "",
          "| N x K | programs (split) | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    md += [f"| {r['n']}x{r['k']} | {r['programs']} ({r['split_k']}) | "
           + " | ".join(f"{r[c]:.2f}" for c in names) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        tag = gpu_tag()
        (Path(args.out) / f"gemv_fixed_{tag}.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
        (Path(args.out) / f"gemv_fixed_{tag}.md").write_text(text)


if __name__ == "__main__":
    main()
