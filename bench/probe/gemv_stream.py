"""Probe: one-row sparse GEMV in few large programs that stream long runs of their kept rows.

Its question: is the deterministic one-row rules' per-call cost (one- or two-warp programs, ~14
per SM, short K-splits with 128-256-byte runs of each kept row, a split-K epilogue) a matter of
bytes in flight or of run length? Variants: one 4-8-warp program per SM (or two), each owning an
N-block of 128-4096 columns over a long K range, its range compacted once into a private scratch,
then its kept rows streamed through Triton's software pipeline (``tl.range(num_stages=...)``:
cp.async rings of several [SUB_K, BLOCK_N] tiles in shared memory). Short runs with deep rings
gained nothing; 2-8 KB runs streamed at cuBLAS's rate (``bench/results/gemv_stream_long_h200.md``),
which is the kernel's default ("stream") rule.

Bias-free, center-free bf16 (the op's other features do not change the byte stream). Times
cuBLAS and the op itself in the same run; weights rotated past L2; CUDA-graph medians.

    PYTHONPATH=. python bench/probe/gemv_stream.py [--out DIR] [--shapes 4096x4096 ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fxsparse.kernels import sparse_gemv as sg
from fxsparse.kernels.timing import gpu_environment, time_calls

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]
SPARSITIES = (0.0, 0.5, 0.9, math.inf)
DT = torch.bfloat16
TOUCH_BYTES = 400e6  # rotate weight copies over more than L2 (50 MB) holds
LONG = False


@triton.jit
def _stream_kernel(x_ptr, w_ptr, out_ptr, ids_ptr, val_ptr, ws_ptr, cnt_ptr, N, K, stride_wk, threshold,
                   split_len, n_blocks, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
                   STEPS: tl.constexpr, SUB_K: tl.constexpr, STAGES: tl.constexpr, ACCUM: tl.constexpr,
                   SPLIT_P2: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    thr = tl.cast(threshold, tl.float32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k0 = pid_k * split_len
    k_end = tl.minimum(K, k0 + split_len)
    prog = (pid_k * n_blocks + pid_n).to(tl.int64)
    ids = ids_ptr + prog * split_len  # private scratch: no other program writes these lines
    vals = val_ptr + prog * split_len
    # phase 1: the whole range compacted, steps unrolled so their x loads can all issue at once
    n_kept = 0
    for st in tl.static_range(STEPS):
        kc = k0 + st * CHUNK + tl.arange(0, CHUNK)
        ok = kc < k_end
        xv = tl.load(x_ptr + kc, mask=ok, other=0.0).to(tl.float32)
        keep = ~(tl.abs(xv) < thr) & ok
        kept = keep.to(tl.int32)
        slot = n_kept + tl.cumsum(kept, axis=0) - 1
        tl.store(ids + slot, kc, mask=keep)
        tl.store(vals + slot, xv, mask=keep)
        n_kept += tl.sum(kept, axis=0)
    tl.debug_barrier()  # the scratch is read back by other threads of this program
    # phase 2: the kept rows, pipelined by Triton (cp.async ring in shared memory)
    offs_s = tl.arange(0, SUB_K)
    acc = tl.zeros((SUB_K, BLOCK_N), dtype=tl.float32)
    for t in tl.range(0, tl.cdiv(n_kept, SUB_K), num_stages=STAGES):
        s = t * SUB_K + offs_s
        s_ok = s < n_kept
        kk = tl.load(ids + s, mask=s_ok, other=0)
        v = tl.load(vals + s, mask=s_ok, other=0.0)
        w = tl.load(w_ptr + kk.to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
                    mask=s_ok[:, None] & n_ok[None, :], other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    part = tl.sum(acc, axis=0)
    if ACCUM:  # float32 output, every split adds its partial (the product's accumulating mode)
        tl.atomic_add(out_ptr + offs_n, part, mask=n_ok, sem="relaxed")
    elif SPLIT == 1:
        tl.store(out_ptr + offs_n, part.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(ws_ptr + pid_k * N + offs_n, part, mask=n_ok)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            sp = tl.arange(0, SPLIT_P2)
            parts = tl.load(ws_ptr + sp[:, None] * N + offs_n[None, :],
                            mask=(sp < SPLIT)[:, None] & n_ok[None, :], other=0.0,
                            cache_modifier=".cg")
            tl.store(out_ptr + offs_n, tl.sum(parts, axis=0).to(out_ptr.dtype.element_ty), mask=n_ok)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")


class Stream:
    """One launch configuration of the probe kernel, with its scratch and counters."""

    def __init__(self, n, k, warps, block_n, sub_k, stages, split, chunk_max=4096, accum=False,
                 device="cuda"):
        self.n, self.k = n, k
        self.warps, self.block_n, self.sub_k, self.stages, self.split = warps, block_n, sub_k, stages, split
        self.accum = accum
        self.n_blocks = triton.cdiv(n, block_n)
        self.split_len = triton.cdiv(triton.cdiv(k, split), 32) * 32
        self.split = triton.cdiv(k, self.split_len)
        self.chunk = min(chunk_max, triton.next_power_of_2(self.split_len))
        self.steps = triton.cdiv(self.split_len, self.chunk)
        progs = self.n_blocks * self.split
        self.ids = torch.empty(progs * self.split_len, dtype=torch.int32, device=device)
        self.vals = torch.empty(progs * self.split_len, dtype=torch.float32, device=device)
        self.ws = torch.empty(self.split * n, dtype=torch.float32, device=device)
        self.cnt = torch.zeros(self.n_blocks, dtype=torch.int32, device=device)
        self.name = f"w{warps} n{block_n} sk{sub_k} st{stages} split{self.split}" + (" acc" if accum else "")
        if accum:
            self.acc_out = torch.zeros(n, dtype=torch.float32, device=device)

    def __call__(self, x, w, thr, out):
        if self.accum:
            out = self.acc_out
        self.compiled = _stream_kernel[(self.n_blocks, self.split)](
            x, w, out, self.ids, self.vals, self.ws, self.cnt, self.n, self.k, w.stride(1), thr,
            self.split_len, self.n_blocks, SPLIT=self.split, BLOCK_N=self.block_n, CHUNK=self.chunk,
            STEPS=self.steps, SUB_K=self.sub_k, STAGES=self.stages, ACCUM=self.accum,
            SPLIT_P2=triton.next_power_of_2(self.split), num_warps=self.warps)
        return out


def long_variants(n: int, k: int, nsm: int) -> list[Stream]:
    """Long contiguous runs per row (2-8 KB), float32 atomics instead of the epilogue."""
    out = []
    for block_n, sub_k in ((1024, 8), (2048, 4), (4096, 2)):
        n_blocks = triton.cdiv(n, block_n)
        for per_sm in (1, 2):
            split = max(1, min(k // 32, round(per_sm * nsm / n_blocks)))
            for stages in (3, 4):
                v = Stream(n, k, 8, block_n, sub_k, stages, split, accum=True)
                if all(v.name != o.name for o in out):
                    out.append(v)
    return out


def variants(n: int, k: int, nsm: int) -> list[Stream]:
    if LONG:
        return long_variants(n, k, nsm)
    out = []
    for block_n in (128, 256):
        n_blocks = triton.cdiv(n, block_n)
        for per_sm in (1, 2):
            split = max(1, min(8, round(per_sm * nsm / n_blocks)))
            split = 1 << (split.bit_length() - 1)  # a power of two: one epilogue load
            for warps, sub_k, stages in ((4, 32, 3), (8, 64, 3), (8, 64, 4), (8, 32, 4), (4, 64, 2)):
                v = Stream(n, k, warps, block_n, sub_k, stages, split)
                if all(v.name != o.name for o in out):
                    out.append(v)
    return out


def _ring(fn, args: list[tuple], ring: int) -> float:
    """Median µs per call of ``fn`` over the argument tuples, cycled to ``ring`` calls, in one graph."""
    return time_calls([functools.partial(fn, *args[i % len(args)]) for i in range(ring)], graphs=True)[0]


def _threshold(x: torch.Tensor, s: float) -> float:
    if s == math.inf:
        return math.inf
    return float(torch.quantile(x.float().abs(), s)) if s > 0 else 0.0


def run_shape(n: int, k: int, nsm: int) -> list[dict]:
    copies = min(64, max(4, math.ceil(TOUCH_BYTES / (n * k * 2))))
    w_cm = [(torch.randn(k, n, device="cuda", dtype=DT) * k**-0.5).t() for _ in range(copies)]
    w_rm = [torch.randn(n, k, device="cuda", dtype=DT) * k**-0.5 for _ in range(copies)]
    xs = [torch.randn(k, device="cuda", dtype=DT) for _ in range(copies)]
    outs = [torch.empty(n, device="cuda", dtype=DT) for _ in range(copies)]
    ring = max(16, copies)
    dense = _ring(F.linear, list(zip(xs, w_rm, strict=True)), ring)
    rows = []
    for s in SPARSITIES:
        thrs = [_threshold(x, s) for x in xs]
        op = _ring(lambda x, w, t: sg.threshold_gemv(x[None], w, None, t),
                   list(zip(xs, w_cm, thrs, strict=True)), ring)
        ref = F.linear(torch.where(xs[0].float().abs() < thrs[0], 0.0, xs[0].float()), w_cm[0].float())
        best = None
        for v in variants(n, k, nsm):
            if v.accum:
                v.acc_out.zero_()
            got = v(xs[0], w_cm[0], thrs[0], outs[0]).float()
            err = ((got - ref).norm() / ref.norm().clamp_min(1e-6)).item()
            if not err < 1e-2:
                print(f"WRONG {n}x{k} s={s} {v.name}: {err}", flush=True)
                continue
            us = _ring(v, list(zip(xs, w_cm, thrs, outs, strict=True)), ring)
            regs = getattr(v.compiled, "n_regs", None), getattr(v.compiled, "n_spills", None)
            rows.append(dict(n=n, k=k, s=s, variant=v.name, us=us, dense_us=dense, op_us=op, regs=regs))
            print(f"{n}x{k} s={s} {v.name:30s} {us:7.1f} µs  dense {dense:6.1f}  op {op:6.1f}  "
                  f"regs/spills {regs}", flush=True)
            if best is None or us < best[1]:
                best = (v.name, us)
        rows.append(dict(n=n, k=k, s=s, variant="best", best=best[0], us=best[1], dense_us=dense, op_us=op))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--long", action="store_true", help="the long-run variants (2-8 KB runs, atomics)")
    args = ap.parse_args()
    global LONG
    LONG = args.long
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    env = gpu_environment()
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    print(env, flush=True)
    rows = []
    for n, k in shapes:
        rows += run_shape(n, k, nsm)
        torch.cuda.empty_cache()
    lines = [f"# Streaming-program probe on {env['gpu']} (torch {env['torch']}, triton {env['triton']})", "",
             "| N x K | s | dense µs | op µs | best probe µs | probe variant | op / dense | probe / dense |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["variant"] == "best"):
        lines.append(f"| {r['n']}x{r['k']} | {r['s']} | {r['dense_us']:.1f} | {r['op_us']:.1f} | "
                     f"{r['us']:.1f} | {r['best']} | {r['dense_us'] / r['op_us']:.2f} | "
                     f"{r['dense_us'] / r['us']:.2f} |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gemv_stream.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
        (out / "gemv_stream.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
