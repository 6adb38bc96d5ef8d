"""Sparse GEMV benchmark: the fused threshold kernel against cuBLAS, at decode shapes.

For each weight shape (N, K), rows (1, 2, 4) and activation sparsity s, times under CUDA graphs:
  * dense: ``F.linear`` (cuBLAS) on the usual row-major weight, and on the column-major copy
    that ``prepare`` leaves behind (what the fallback path runs);
  * sparse: ``sparse_gemv.threshold_gemv`` on the column-major weight, thresholds set to the
    s-quantile of |x| so the achieved sparsity is s (independent random masks per row).
Weights are rotated among enough copies that L2 (50 MB) holds none of what one pass touches.
Reports µs, speedup over dense, the fraction of the ideal 1/(1 - s_union), and achieved TB/s of
the bytes that must move ((1 - s_union)·N·K·2 + x + out) against the copy bandwidth measured
in the same run. A correctness check runs first and aborts the benchmark on any mismatch.

    PYTHONPATH=. python bench/gemv.py --out $OUT [--sweep] [--quick] [--group]

``--group`` times sibling projections that share x and the mask (Llama-3-8B's q/k/v and
gate/up): one ``threshold_gemv_group`` launch against the members launched one by one, against
cuBLAS per member, and against one cuBLAS call on the members' weights concatenated.
``--crossover`` times the fused kernel forced on at 2-16 rows (the one-row kernel's stream, which
the op takes for two rows; three variants) against cuBLAS at s = 0 / 0.5 / 0.8 / 0.9.
``--compiled`` times RMSNorm -> linear pairs compiled by Inductor (dense) and by ``sparse_act``
(where a multi-row call's mask fuses into the norm).
``--weights fp8|int8`` times 8-bit weights as torchao's weight-only configs make them
(``Float8WeightOnlyConfig`` / ``Int8WeightOnlyConfig``, per-row scales) instead of the bf16
table: bf16 cuBLAS on the same shape, torchao's own one-row path (``torch.compile``d
``F.linear`` on its tensor), and the op on the column-major 8-bit data with its scales, at
s = 0 / 0.25 / 0.5 / 0.75 / 0.9 (1-2 rows); TB/s and the fraction of copy bandwidth count
the kept 8-bit rows + scales + x + out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fxsparse.kernels import sparse_gemv as sg
from fxsparse.kernels.threshold_linear import threshold_linear_cuda, threshold_linear_reference
from fxsparse.kernels.timing import copy_bandwidth, gpu_tag, time_calls

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9]
DT = torch.bfloat16
SWEEP_CHECK = {(torch.bfloat16, 1, 4096), (torch.bfloat16, 1, 1000)}  # (dtype, rows, N) checked per variant
BAD_VARIANTS: set[str] = set()  # sweep variants that failed the correctness check: not timed
TOUCH_BYTES = 1.5e9  # weight copies per shape: a 90%-sparse pass over them still spans 3x L2


# -- timing -------------------------------------------------------------------------------------


def time_graph(calls, trials: int = 5, min_ms: float = 10.0) -> tuple[float, float]:
    """Median µs per call of the calls replayed in one CUDA graph, and the trials' spread."""
    return time_calls(calls, trials, min_ms, graphs=True)


@triton.jit
def _empty_kernel(out_ptr):
    tl.store(out_ptr + tl.program_id(0), 0.0)


def time_empty(programs: int) -> float:
    """A grid of programs that each store one float: the launch + scheduling floor (µs)."""
    bufs = [torch.empty(programs, device="cuda") for _ in range(16)]
    return time_graph([lambda b=b: _empty_kernel[(programs,)](b) for b in bufs])[0]


# -- correctness --------------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).ne(torch.isnan(ref)).any():
        return math.inf
    fin = ref.isfinite()
    return float((out[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30))


def correctness_check(sweep: bool = False, crossover: bool = False) -> None:
    """Kernel vs float64 reference on a few shapes, dtypes and centers; abort on mismatch."""
    torch.manual_seed(0)
    tol = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}
    bad = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n, k in [(4096, 4096), (1000, 3001), (14336, 4096), (77, 33)]:
            for rows in (1, 3, 4, 8, 16):
                for center in (None, "scalar", "channel"):
                    x = torch.randn(rows, k, device="cuda").to(dtype)
                    if rows > 2:
                        x[0, k // 2], x[1, k // 3] = math.nan, math.inf
                    w = (torch.randn(k, n, device="cuda") / math.sqrt(k)).to(dtype).t()
                    b = torch.randn(n, device="cuda").to(dtype)
                    c = {
                        None: None,
                        "scalar": torch.tensor(0.3, device="cuda"),
                        "channel": 0.5 * torch.randn(k, device="cuda"),
                    }[center]
                    sc = torch.rand(k, device="cuda") + 0.5
                    cb = None if c is None else w.float() @ c.to(dtype).float().expand(k)
                    up = lambda t: None if t is None else t.double()
                    ref = threshold_linear_reference(up(x), up(w), up(b), 0.7, up(c), up(sc))
                    nsm = torch.cuda.get_device_properties(0).multi_processor_count
                    cfgs = {"default": None}
                    # variants: bf16, one row, an aligned and an odd shape (each compiles per case)
                    if sweep and (dtype, rows, n) in SWEEP_CHECK and center != "scalar":
                        cfgs.update(variants(rows, n, k, nsm))
                    if crossover and rows > 1:  # what --crossover times
                        cfgs.update(stream_variants(rows, n, k, x.element_size(), nsm))
                    for name, cfg in cfgs.items():
                        out = sg.threshold_gemv(x, w, b, 0.7, c, sc, cb, config=cfg)
                        e = rel_err(out, ref)
                        if not e < tol[dtype]:
                            bad.append((str(dtype), n, k, rows, center, name, e))
    torch.cuda.synchronize()
    if bad:
        print("!!!!!!!! CORRECTNESS CHECK FAILED: kernel disagrees with the reference !!!!!!!!")
        for b_ in bad:
            print("   ", b_)
        BAD_VARIANTS.update(b_[5] for b_ in bad)
        if "default" in BAD_VARIANTS:
            sys.exit(1)
    print("correctness check: OK (3 dtypes x 4 shapes x 5 row counts x 3 centers)")


def stream_variants(rows: int, n: int, k: int, elem_size: int, nsm: int) -> dict:
    """The one-row kernel's stream forced on for several rows: its default (FMAs up to
    ``MAX_FMA_ROWS``, tensor cores above), two programs per SM, and tensor cores with three
    stages of 64 KB tiles (the rows-4 probe's best tensor-core variant, gemv_balance_h200.md)."""
    pick = functools.partial(sg._pick_config, rows, n, k, elem_size, nsm, row_kernel=True,
                             deterministic=False)
    out = {"stream": pick(), "stream pps2": pick(programs_per_sm=2)}
    if rows <= sg.MAX_FMA_ROWS:
        out["dot st3"] = pick(row_dot=True, stages=3)
    else:
        out["stream st3"] = pick(stages=3)
    return {name: c for name, c in out.items() if sg._sums_fit(c, rows, [n])}  # else the op takes partials


# -- one shape ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    n: int
    k: int
    w_cm: list[torch.Tensor]  # column-major copies (the kernel's layout)
    w_rm: list[torch.Tensor]  # row-major copies (dense baseline)


def make_setup(n: int, k: int) -> Setup:
    size = n * k * 2
    c_cm = min(64, max(4, math.ceil(TOUCH_BYTES / size)))
    c_rm = min(64, max(4, math.ceil(250e6 / size)))
    w_cm = [(torch.randn(k, n, device="cuda", dtype=DT) * k**-0.5).t() for _ in range(c_cm)]
    w_rm = [torch.randn(n, k, device="cuda", dtype=DT) * k**-0.5 for _ in range(c_rm)]
    return Setup(n, k, w_cm, w_rm)


def cycle(items: list, at_least: int = 16) -> list:
    return [items[i % len(items)] for i in range(max(len(items), at_least))]


def time_dense(st: Setup, rows: int, column_major: bool = False) -> float:
    ws = st.w_cm if column_major else st.w_rm
    xs = [torch.randn(rows, st.k, device="cuda", dtype=DT) for _ in ws]
    calls = [lambda x=x, w=w: F.linear(x, w) for x, w in cycle(list(zip(xs, ws, strict=True)))]
    return time_graph(calls)[0]


def sparse_inputs(st: Setup, rows: int, s: float):
    """Per weight copy: x, threshold (s-quantile of |x|), achieved row and union sparsity."""
    out = []
    for _ in st.w_cm:
        x = torch.randn(rows, st.k, device="cuda", dtype=DT)
        if s >= 1:  # τ = ∞: nothing kept, the kernel's fixed cost alone
            thr = math.inf
        else:
            thr = float(torch.quantile(x.float().abs().flatten(), s)) if s > 0 else 0.0
        keep = ~(x.float().abs() < thr)
        out.append((x, thr, 1 - keep.float().mean().item(), 1 - keep.any(0).float().mean().item()))
    return out


def time_sparse(st: Setup, rows: int, inputs, config=None, check: bool = True):
    """The op as a user gets it (``config`` None: the CUDA implementation's dispatch, i.e. the
    kernel for up to ``max_rows`` rows and mask + cuBLAS above), the kernel with ``config``, or
    (``config="mask+cublas"``) the fallback forced."""
    if config is None:
        fn = lambda x, w, thr: threshold_linear_cuda(x, w, None, thr)
    elif config == "mask+cublas":
        fn = lambda x, w, thr: F.linear(sg.masked_input(x, thr), w)
    else:
        fn = lambda x, w, thr: sg.threshold_gemv(x, w, None, thr, config=config)
    if check:  # every timed configuration computes the right thing
        x, thr, _, _ = inputs[0]
        out = fn(x, st.w_cm[0], thr)
        ref = F.linear(torch.where(x.float().abs() < thr, 0.0, x.float()), st.w_cm[0].float())
        e = rel_err(out, ref)
        if not e < 1e-2:
            print(f"!!!! WRONG RESULT n={st.n} k={st.k} rows={rows} config={config}: err {e}")
            sys.exit(1)
    pairs = cycle(list(zip(inputs, st.w_cm, strict=True)))
    calls = [lambda i=i, w=w: fn(i[0], w, i[1]) for i, w in pairs]
    return time_graph(calls)


GROUPS = [((4096, 1024, 1024), 4096), ((14336, 14336), 4096)]  # q/k/v, gate/up of Llama-3-8B


def time_groups(nsm: int) -> list[dict]:
    """Sibling sets: one grouped launch vs the members one by one (kernel, cuBLAS, fused cuBLAS)."""
    out = []
    for ns, k in GROUPS:
        size = sum(ns) * k * 2
        copies = min(64, max(4, math.ceil(TOUCH_BYTES / size)))
        ws = [[(torch.randn(k, n, device="cuda", dtype=DT) * k**-0.5).t() for n in ns] for _ in range(copies)]
        rm = [[torch.randn(n, k, device="cuda", dtype=DT) * k**-0.5 for n in ns] for _ in range(copies)]
        cat = [torch.cat(m) for m in rm]
        xs = [torch.randn(1, k, device="cuda", dtype=DT) for _ in range(copies)]
        name = "+".join(map(str, ns)) + f"x{k}"
        pairs = list(zip(xs, rm, strict=True))
        dense = time_graph([lambda x=x, m=m: [F.linear(x, w) for w in m] for x, m in pairs])[0]
        fused = time_graph([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, cat, strict=True)])[0]
        for s in (0.0, 0.5, 0.9, 1.0):
            thr = [math.inf if s >= 1 else float(torch.quantile(x.float().abs(), s)) if s > 0 else 0.0
                   for x in xs]
            args = list(zip(xs, ws, thr, strict=True))
            x0, m0, t0 = args[0]
            outs = sg.threshold_gemv_group(x0, m0, [None] * len(ns), t0)
            for o, w in zip(outs, m0, strict=True):  # every timed launch computes the right thing
                ref = F.linear(torch.where(x0.float().abs() < t0, 0.0, x0.float()), w.float())
                if not rel_err(o, ref) < 1e-2:
                    print(f"!!!! WRONG GROUP RESULT {name} s={s}")
                    sys.exit(1)
            grouped = time_graph([lambda x=x, m=m, t=t: sg.threshold_gemv_group(x, m, [None] * len(m), t)
                                  for x, m, t in args])[0]
            alone = time_graph([lambda x=x, m=m, t=t: [sg.threshold_gemv(x, w, None, t) for w in m]
                                for x, m, t in args])[0]
            r = dict(group=name, s=s, grouped_us=grouped, separate_us=alone, dense_us=dense,
                     dense_fused_us=fused, speedup=dense / grouped, vs_separate=alone / grouped)
            out.append(r)
            print(f"  group {name} s={s:.1f}: grouped {grouped:7.1f} us, one by one {alone:7.1f}, "
                  f"cuBLAS {dense:7.1f} (fused {fused:7.1f})  x{r['speedup']:.2f} vs cuBLAS, "
                  f"x{r['vs_separate']:.2f} vs one by one", flush=True)
        del ws, rm, cat
        torch.cuda.empty_cache()
    return out


def time_compiled(shapes: list[tuple[int, int]], rows_list: list[int]) -> list[dict]:
    """RMSNorm -> linear pairs, compiled: Inductor dense vs ``sparse_act``, as a model gets them.

    The op alone must run its mask as a kernel of its own above one row; compiled, the lower
    pass leaves that mask to Inductor, which fuses it into the norm that produces x. Several
    pairs per graph (their weights exceed L2), one CUDA graph around the compiled call; µs per
    pair, norm included on both sides.
    """
    from torch import nn

    from fxsparse import LayerPlan, SparsityPlan, prepare_weights

    class Pairs(nn.Module):
        def __init__(self, n: int, k: int, copies: int) -> None:
            super().__init__()
            self.norms = nn.ModuleList(nn.RMSNorm(k, eps=1e-6) for _ in range(copies))
            self.projs = nn.ModuleList(nn.Linear(k, n, bias=False) for _ in range(copies))

        def forward(self, hs):
            return [p(m(h)) for m, p, h in zip(self.norms, self.projs, hs, strict=True)]

    out = []
    for n, k in shapes:
        copies = min(8, max(4, math.ceil(TOUCH_BYTES / (n * k * 2))))  # 8 compile in seconds
        model = Pairs(n, k, copies).to("cuda", DT).eval()
        sparse_model = copy.deepcopy(model)  # column-major weights, as fxsparse.compile leaves them
        prepare_weights(sparse_model, SparsityPlan(layers={
            f"projs.{i}": LayerPlan(1.0, k, n) for i in range(copies)}), dense_when_faster=False)
        for rows in rows_list:
            hs = [torch.randn(rows, k, device="cuda", dtype=DT) for _ in range(copies)]
            with torch.no_grad():
                x0 = model.norms[0](hs[0]).float().abs().flatten()
            torch._dynamo.reset()
            dense_fn = torch.compile(model)
            with torch.no_grad():
                dense = time_graph([lambda f=dense_fn, a=hs: f(a)])[0] / copies
            for s in (0.0, 0.5, 0.9):
                thr = float(torch.quantile(x0, s)) if s > 0 else 0.0
                plan = SparsityPlan(layers={f"projs.{i}": LayerPlan(thr, k, n, target_sparsity=s)
                                            for i in range(copies)})
                torch._dynamo.reset()
                record: list = []
                sparse_fn = torch.compile(sparse_model, backend="sparse_act", options=dict(
                    plan=plan, dense_when_faster=False, record=record))
                with torch.no_grad():
                    got = sparse_fn(hs)[0]
                    want = threshold_linear_reference(model.norms[0](hs[0]), model.projs[0].weight, None, thr)
                    if not rel_err(got, want) < 2e-2:
                        print(f"!!!! WRONG COMPILED RESULT {n}x{k} rows={rows} s={s}")
                        sys.exit(1)
                    us = time_graph([lambda f=sparse_fn, a=hs: f(a)])[0] / copies
                ops = sorted({d["op"] for r in record for d in r["decisions"]})
                r = dict(n=n, k=k, rows=rows, s=s, dense_us=dense, sparse_us=us, speedup=dense / us,
                         lowered=ops)
                out.append(r)
                print(f"  compiled {n}x{k} rows={rows} s={s:.1f}: dense {dense:7.1f} us, sparse_act "
                      f"{us:7.1f} us  x{dense / us:.2f}  {ops}", flush=True)
        del model, sparse_model
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return out


def compiled_markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# RMSNorm -> linear, compiled, on {env['gpu']} (torch {env['torch']}, triton {env['triton']})",
             "", "bf16, µs per pair (norm included), one CUDA graph around the compiled call; dense = "
             "torch.compile (Inductor + cuBLAS), sparse_act = the same model with a plan at sparsity s "
             "(the one-row kernel for 1 row; above that the mask fused into the norm, then cuBLAS).", "",
             "| N x K | rows | s | dense µs | sparse_act µs | speedup | lowered to |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']}x{r['k']} | {r['rows']} | {r['s']:.1f} | {r['dense_us']:.1f} | "
              f"{r['sparse_us']:.1f} | {r['speedup']:.2f} | {'; '.join(r['lowered'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def group_markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Sibling projections in one launch on {env['gpu']} (torch {env['torch']}, "
             f"triton {env['triton']})", "",
             "bf16, one row, CUDA-graph medians, µs. s = 1: τ = ∞ (nothing kept). cuBLAS: one "
             "F.linear per member; fused: one F.linear on the concatenated weight.", "",
             "| members x K | s | grouped | one by one | cuBLAS | cuBLAS fused | vs cuBLAS | vs one by one |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['s']:.1f} | {r['grouped_us']:.1f} | {r['separate_us']:.1f} | "
              f"{r['dense_us']:.1f} | {r['dense_fused_us']:.1f} | {r['speedup']:.2f} | "
              f"{r['vs_separate']:.2f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


# -- 8-bit weights (torchao) ----------------------------------------------------------------------

QUANT_SPARSITIES = [0.0, 0.25, 0.5, 0.75, 0.9]


def torchao_copies(n: int, k: int, weights: str, copies: int) -> list[torch.Tensor]:
    """``copies`` [N, K] weights quantized by torchao's weight-only config (its tensor subclass)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = {"fp8": Float8WeightOnlyConfig, "int8": Int8WeightOnlyConfig}[weights]
    out = []
    for _ in range(copies):
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=DT)
        with torch.no_grad():
            lin.weight.normal_(0, k**-0.5)
        quantize_(lin, config())
        out.append(lin.weight)
    return out


def time_graph_or_eager(calls) -> tuple[float, bool]:
    """µs per call in a CUDA graph, or (when a call cannot be captured) eagerly; and which."""
    try:
        return time_graph(calls)[0], True
    except Exception as e:  # noqa: BLE001  (a path that does not capture: time it eagerly)
        print(f"  (not capturable: {type(e).__name__}: {str(e)[:120]}; timed eagerly)", flush=True)
        torch.cuda.synchronize()
        return time_calls(calls, 5, 10.0, graphs=False)[0], False


def quant_table(weights: str, shapes, rows_list, env: dict) -> list[dict]:
    """8-bit weights: bf16 cuBLAS, torchao's compiled one-row path, the op (module docstring)."""
    from fxsparse.quantized import weight_format

    out = []
    tao_linear = torch.compile(lambda x, w: F.linear(x, w), dynamic=False)
    for n, k in shapes:
        copies = min(64, max(4, math.ceil(TOUCH_BYTES / (n * k))))
        tao = torchao_copies(n, k, weights, copies)
        fmts = [weight_format(w) for w in tao]
        assert all(f.quantized for f in fmts), fmts[0].reason
        qs = [f.qdata.t().contiguous().t() for f in fmts]  # the op's layout (torchao keeps its own)
        scales = [f.scale for f in fmts]
        st = make_setup(n, k)  # bf16 copies for cuBLAS
        for rows in rows_list:
            dense = time_dense(st, rows)
            xs0 = [torch.randn(rows, k, device="cuda", dtype=DT) for _ in tao]
            x0 = xs0[0]
            with torch.no_grad():  # torchao's path and the op against the float64 dequantized layer
                ref = F.linear(x0.double(), fmts[0].qdata.double() * scales[0].double()[:, None])
                got_tao = tao_linear(x0, tao[0])
                got = threshold_linear_cuda(x0, qs[0], None, 0.0, weight_scale=scales[0])
            e_tao, e_op = rel_err(got_tao, ref), rel_err(got, ref)
            if not e_op < 1e-2:
                print(f"!!!! WRONG 8-BIT RESULT {n}x{k} rows={rows}: {e_op}")
                sys.exit(1)
            pairs = list(zip(xs0, tao, strict=True))
            with torch.no_grad():
                tao_us, tao_graph = time_graph_or_eager(
                    [lambda x=x, w=w: tao_linear(x, w) for x, w in cycle(pairs)])
            print(f"\n[{weights} {n}x{k} rows={rows}] bf16 cuBLAS {dense:.1f} us, torchao {tao_us:.1f} us "
                  f"(graph {tao_graph}, err {e_tao:.1e}), op err {e_op:.1e}", flush=True)
            for s in QUANT_SPARSITIES:
                inputs = []
                for x in xs0:
                    thr = float(torch.quantile(x.float().abs().flatten(), s)) if s > 0 else 0.0
                    keep = ~(x.float().abs() < thr)
                    inputs.append((x, thr, 1 - keep.float().mean().item(),
                                   1 - keep.any(0).float().mean().item()))
                x, thr = inputs[0][:2]
                got = threshold_linear_cuda(x, qs[0], None, thr, weight_scale=scales[0])
                ref = F.linear(torch.where(x.float().abs() < thr, 0.0, x.float()).double(),
                               fmts[0].qdata.double() * scales[0].double()[:, None])
                if not rel_err(got, ref) < 1e-2:
                    print(f"!!!! WRONG 8-BIT RESULT {n}x{k} rows={rows} s={s}")
                    sys.exit(1)
                calls = [lambda i=i, q=q, sc=sc: threshold_linear_cuda(i[0], q, None, i[1], weight_scale=sc)
                         for i, q, sc in cycle(list(zip(inputs, qs, scales, strict=True)))]
                us, spread = time_graph(calls)
                su = statistics.mean(i[3] for i in inputs)
                need = (1 - su) * n * k + 4 * n + rows * k * 2 + rows * n * 2
                r = dict(weights=weights, n=n, k=k, rows=rows, s=s, s_union=su, us=us, spread=spread,
                         dense_us=dense, torchao_us=tao_us, torchao_graph=tao_graph, speedup=dense / us,
                         vs_torchao=tao_us / us, tbps=need / us / 1e6,
                         config=dataclasses.asdict(sg._pick_config(rows, n, k, 1, env["sms"])))
                r["frac_copy_bw"] = r["tbps"] / env["copy_tbps"]
                out.append(r)
                print(f"  s={s:.2f} (union {su:.3f}) {us:8.1f} us  x{r['speedup']:5.2f} vs bf16 cuBLAS, "
                      f"x{r['vs_torchao']:5.2f} vs torchao  {r['tbps']:.2f} TB/s "
                      f"({r['frac_copy_bw']:.2f} of copy)  spread {spread:.1%}", flush=True)
        del tao, fmts, qs, scales, st
        torch.cuda.empty_cache()
    return out


def quant_markdown(env: dict, rows: list[dict]) -> str:
    w = rows[0]["weights"] if rows else "?"
    lines = [f"# Sparse GEMV, {w} weights (torchao weight-only), on {env['gpu']} (torch {env['torch']}, "
             f"triton {env['triton']}, torchao {env.get('torchao')})", "",
             f"bf16 activations, CUDA-graph medians (torchao's path eagerly where marked); copy bandwidth "
             f"{env['copy_tbps']:.2f} TB/s (read + write). bf16 cuBLAS: F.linear on a bf16 weight of the "
             "shape; torchao: torch.compile(F.linear) on torchao's tensor (its one-row path); op: "
             "fxsparse::threshold_linear on the column-major 8-bit data with per-row scales. TB/s counts "
             "the kept 8-bit rows + scales + x + out.", "",
             "| N x K | rows | s | s_union | bf16 cuBLAS µs | torchao µs | op µs | vs cuBLAS | vs torchao "
             "| TB/s | of copy BW |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']}x{r['k']} | {r['rows']} | {r['s']:.2f} | {r['s_union']:.3f} | "
              f"{r['dense_us']:.1f} | {r['torchao_us']:.1f}{'' if r['torchao_graph'] else ' (eager)'} | "
              f"{r['us']:.1f} | "
              f"{r['speedup']:.2f} | {r['vs_torchao']:.2f} | {r['tbps']:.2f} | {r['frac_copy_bw']:.2f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------


def variants(rows: int, n: int, k: int, nsm: int):
    """Configurations tried by --sweep around the default heuristic (same configs dropped).

    The other rules of ``_row_defaults`` on this shape, programmatic dependent launch, smaller
    tiles and fewer programs per SM (``docs/performance.md`` lists what such sweeps rejected).
    """
    out = {}

    def add(name, **kw):
        cfg = sg._pick_config(rows, n, k, 2, nsm, **kw)
        if cfg not in out.values():
            out[name] = cfg

    add("default")
    if rows == 1:
        add("pdl", pdl=True)
        add("sub_k 8", sub_k=8)
        add("12 per SM", programs_per_sm=12)
        one_warp = dict(num_warps=1, block_n=128, sub_k=16, acc_tile=False, epi_floats=64)
        add("one warp, 128-ch splits", **one_warp, chunk_k=128)  # the other rules of _row_defaults
        add("two warps", num_warps=2, block_n=64, sub_k=8, acc_tile=True, epi_floats=64, chunk_k=256)
        add("one warp, 256-ch splits", **one_warp, chunk_k=256)
    return out


def sweep_shape(st: Setup, rows: int, dense_us: float, nsm: int) -> list[dict]:
    """Every variant at s = 0 / 0.5 / 0.9 (and τ = ∞ for one row: the kernel without weight
    traffic), the launch floor of the default grid, and the op's mask + cuBLAS path for rows > 1."""
    n, k = st.n, st.k
    base = dict(n=n, k=k, rows=rows)
    out = []

    def record(s: float, name: str, us: float, **extra) -> None:
        out.append(dict(base, s=s, variant=name, us=us, speedup=dense_us / us, **extra))
        print(f"  sweep s={s:.1f} {name:18s} {us:8.1f} us  x{dense_us / us:5.2f}", flush=True)

    cfg0 = sg._pick_config(rows, n, k, 2, nsm)
    record(1.0, "empty grid", time_empty(triton.cdiv(n, cfg0.block_n) * cfg0.split_k))
    if rows > 1:  # the op's path above max_rows: mask kernel + cuBLAS
        for s in (0.0, 0.9):
            pairs = cycle(list(zip(sparse_inputs(st, rows, s), st.w_cm, strict=True)))
            calls = [lambda i=i, w=w: F.linear(sg.masked_input(i[0], i[1]), w) for i, w in pairs]
            record(s, "mask+cublas", time_graph(calls)[0])
    for s in (0.0, 0.5, 0.9, 1.0) if rows == 1 else (0.0, 0.5, 0.9):
        inputs = sparse_inputs(st, rows, s)
        su = statistics.mean(i[3] for i in inputs)
        for name, cfg in variants(rows, n, k, nsm).items():
            if name in BAD_VARIANTS:
                continue
            try:
                us, spread = time_sparse(st, rows, inputs, cfg)
            except Exception as e:  # noqa: BLE001  (a variant that fails to compile)
                print(f"  sweep {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                BAD_VARIANTS.add(name)
                continue
            record(
                s,
                name,
                us,
                s_union=su,
                config=dataclasses.asdict(cfg),
                spread=spread,
                frac_ideal=dense_us / us * (1 - su),
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--sweep", action="store_true", help="also time block-size variants")
    ap.add_argument("--crossover", action="store_true",
                    help="the fused kernel forced on at 2-16 rows against cuBLAS")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-table", action="store_true", help="skip the default-config table")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--group", action="store_true", help="also time sibling sets in one launch")
    ap.add_argument("--shapes", nargs="*", default=None, help="N x K to run, e.g. 4096x4096")
    ap.add_argument("--weights", choices=["bf16", "fp8", "int8"], default="bf16",
                    help="8-bit weights as torchao quantizes them: the 8-bit table instead of the bf16 one")
    ap.add_argument("--compiled", nargs="*", default=None, metavar="NxK",
                    help="also time RMSNorm -> linear pairs compiled, dense vs sparse_act, on these "
                         "shapes (default 4096x4096 14336x4096)")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    env = dict(
        gpu=props.name,
        sms=props.multi_processor_count,
        torch=torch.__version__,
        triton=triton.__version__,
        l2_mb=props.L2_cache_size / 2**20,
    )
    tag = gpu_tag()
    print(env, flush=True)
    correctness_check(args.sweep, args.crossover)
    env["copy_tbps"] = copy_bandwidth()
    print(f"copy bandwidth {env['copy_tbps']:.2f} TB/s", flush=True)
    nsm = props.multi_processor_count
    if args.weights != "bf16":
        import torchao

        env["torchao"] = torchao.__version__
        shapes = [tuple(map(int, sh.split("x"))) for sh in args.shapes] if args.shapes else SHAPES
        rows = [r for r in args.rows if r <= sg.max_rows(1, 1, torch.int8)] or [1]
        table = quant_table(args.weights, shapes[:2] if args.quick else shapes, rows, env)
        doc = json.dumps(dict(env=env, results=table), indent=1)
        (out_dir / f"gemv_{args.weights}_{tag}.json").write_text(doc)
        (out_dir / f"gemv_{args.weights}_{tag}.md").write_text(quant_markdown(env, table))
        print(quant_markdown(env, table))
        return

    if args.group:
        groups = time_groups(nsm)
        (out_dir / f"gemv_group_{tag}.json").write_text(json.dumps(dict(env=env, rows=groups), indent=1))
        (out_dir / f"gemv_group_{tag}.md").write_text(group_markdown(env, groups))
        print(group_markdown(env, groups))
    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(map(int, sh.split("x"))) for sh in args.shapes]
    if args.compiled is not None:
        comp_shapes = [tuple(map(int, sh.split("x"))) for sh in args.compiled or ["4096x4096", "14336x4096"]]
        comp = time_compiled(comp_shapes, args.rows)
        (out_dir / f"gemv_compiled_{tag}.json").write_text(json.dumps(dict(env=env, rows=comp), indent=1))
        (out_dir / f"gemv_compiled_{tag}.md").write_text(compiled_markdown(env, comp))
        print(compiled_markdown(env, comp))
    results, sweep, crossover = [], [], []
    for n, k in shapes:
        st = make_setup(n, k)
        wbytes = n * k * 2
        for rows in args.rows:
            dense_us = time_dense(st, rows)
            dense_cm_us = time_dense(st, rows, column_major=True)
            print(
                f"\n[{n}x{k} rows={rows}] dense {dense_us:.1f} us "
                f"({wbytes / dense_us / 1e6:.2f} TB/s), column-major cuBLAS {dense_cm_us:.1f} us",
                flush=True,
            )
            if args.sweep:
                sweep += sweep_shape(st, rows, dense_us, nsm)
            for s in [] if args.no_table else SPARSITIES:
                inputs = sparse_inputs(st, rows, s)
                sr = statistics.mean(i[2] for i in inputs)
                su = statistics.mean(i[3] for i in inputs)
                us, spread = time_sparse(st, rows, inputs)
                fallback = time_sparse(st, rows, inputs, "mask+cublas")[0] if rows > 1 else math.nan
                need = (1 - su) * wbytes + rows * k * 2 + rows * n * 2
                r = dict(
                    n=n,
                    k=k,
                    rows=rows,
                    s=s,
                    s_row=sr,
                    s_union=su,
                    us=us,
                    spread=spread,
                    dense_us=dense_us,
                    dense_cm_us=dense_cm_us,
                    mask_cublas_us=fallback,
                    speedup=dense_us / us,
                    ideal=1 / (1 - su),
                    frac_ideal=dense_us / us * (1 - su),
                    tbps=need / us / 1e6,
                    dense_tbps=wbytes / dense_us / 1e6,
                    config=dataclasses.asdict(sg._pick_config(rows, n, k, 2, nsm)),
                )
                r["frac_copy_bw"] = r["tbps"] / env["copy_tbps"]
                results.append(r)
                print(
                    f"  s={s:.2f} (union {su:.3f}) {us:8.1f} us  x{r['speedup']:5.2f} "
                    f"of ideal {r['ideal']:5.2f} ({r['frac_ideal']:.2f})  {r['tbps']:.2f} TB/s"
                    f"  spread {spread:.1%}",
                    flush=True,
                )
        if args.crossover:  # the fused kernel forced on for several rows: the one-row kernel's stream
            for rows in (2, 3, 4, 8, 16):
                d = time_dense(st, rows)
                for s in (0.0, 0.5, 0.8, 0.9):
                    inputs = sparse_inputs(st, rows, s)
                    su = statistics.mean(i[3] for i in inputs)
                    for name, cfg in stream_variants(rows, n, k, 2, nsm).items():
                        if name in BAD_VARIANTS:
                            continue
                        us, _ = time_sparse(st, rows, inputs, cfg)
                        crossover.append(dict(n=n, k=k, rows=rows, s=s, s_union=su, us=us, dense_us=d,
                                              speedup=d / us, dot=cfg.use_dot, variant=name))
                        print(
                            f"  crossover rows={rows:2d} s={s:.1f} (union {su:.2f}) {name:12s} {us:8.1f} us"
                            f" dense {d:8.1f} us  x{d / us:.2f}",
                            flush=True,
                        )
        del st
        torch.cuda.empty_cache()
        # written after every shape, so a run cut short still leaves its numbers
        doc = dict(env=env, results=results, sweep=sweep, crossover=crossover, seconds=time.time() - t_start)
        (out_dir / f"gemv_{tag}.json").write_text(json.dumps(doc, indent=1))
        md = markdown(env, results, crossover)
        if not args.no_table:
            (out_dir / f"gemv_{tag}.md").write_text(md)
        if sweep:
            (out_dir / f"gemv_sweep_{tag}.md").write_text(sweep_markdown(env, sweep))
    print("\n" + md)
    if sweep:
        print(sweep_markdown(env, sweep))
        print_registers()


_ROW_KNOBS = ("NUM_W", "CENTER_MODE", "HAS_SCALE", "HAS_BIAS", "HAS_CB", "BLOCK_N", "CHUNK_K", "SUB_K",
              "ACC_TILE", "PDL", "STAGES", "ATOMIC_EPI")


def print_registers() -> None:
    """Registers and spills of every compiled one-row kernel (occupancy is what they limit)."""
    names = sg._row_gemv_kernel.arg_names
    try:
        for cache in sg._row_gemv_kernel.device_caches.values():
            for ck in cache[0].values():
                consts = getattr(getattr(ck, "src", None), "constants", {})
                c = {names[i[0]]: v for i, v in consts.items() if names[i[0]] in _ROW_KNOBS}
                print(f"  row kernel: {ck.n_regs} registers, {ck.n_spills} spills, warps "
                      f"{ck.metadata.num_warps}, {c}")
    except Exception as e:  # noqa: BLE001  (Triton-version internals: informational only)
        print(f"  (registers unavailable: {type(e).__name__}: {e})")


def sweep_markdown(env: dict, sweep: list[dict]) -> str:
    """One line per (shape, rows, variant): speedup over cuBLAS at each swept sparsity."""
    lines = [f"# Sweep on {env['gpu']} (torch {env['torch']}, triton {env['triton']}): speedup / µs", ""]
    keys = sorted({(r["n"], r["k"], r["rows"]) for r in sweep}, key=lambda t: (t[2], t[0] * t[1]))
    for n, k, rows in keys:
        rs = [r for r in sweep if (r["n"], r["k"], r["rows"]) == (n, k, rows)]
        ss = sorted({r["s"] for r in rs})
        lines += [f"{n}x{k} rows={rows}: " + " | ".join(f"s={v:.1f}" for v in ss)]
        for name in dict.fromkeys(r["variant"] for r in rs):
            cells = []
            for v in ss:
                m = [r for r in rs if r["variant"] == name and r["s"] == v]
                cells.append(f"{m[0]['speedup']:.2f}x {m[0]['us']:.1f}" if m else "-")
            lines.append(f"  {name:20s} " + " | ".join(cells))
    return "\n".join(lines) + "\n"


def markdown(env: dict, results: list[dict], crossover: list[dict]) -> str:
    lines = [
        f"# Sparse GEMV on {env['gpu']} (torch {env['torch']}, triton {env['triton']})",
        "",
        f"bf16, CUDA-graph medians; copy bandwidth {env['copy_tbps']:.2f} TB/s (read + write). "
        "speedup = cuBLAS dense (row-major weight) / the op (column-major weight: the fused kernel "
        "for one or two rows, one mask kernel + cuBLAS for more); "
        "ideal = 1 / (1 - union sparsity); TB/s counts only the weight rows that must be read.",
        "",
        "| N x K | rows | s | s_union | dense µs | op µs | speedup | ideal | of ideal "
        "| TB/s | of copy BW | mask + cuBLAS µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['n']}x{r['k']} | {r['rows']} | {r['s']:.2f} | {r['s_union']:.3f} "
            f"| {r['dense_us']:.1f} | {r['us']:.1f} | {r['speedup']:.2f} | {r['ideal']:.2f} "
            f"| {r['frac_ideal']:.2f} | {r['tbps']:.2f} | {r['frac_copy_bw']:.2f} "
            f"| {r['mask_cublas_us']:.1f} |".replace("| nan |", "| - |")
        )
    if crossover:
        lines += [
            "",
            "Rows crossover: the fused kernel forced on (the one-row kernel's stream, `row_kernel=True`: "
            "FMAs up to 4 rows, tensor cores above), against cuBLAS:",
            "",
            "| N x K | rows | s | s_union | variant | products | dense µs | kernel µs | speedup | of ideal |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['n']}x{c['k']} | {c['rows']} | {c['s']:.1f} | {c['s_union']:.3f} | {c['variant']} | "
            f"{'tensor cores' if c['dot'] else 'FMA'} | {c['dense_us']:.1f} | {c['us']:.1f} | "
            f"{c['speedup']:.2f} | {c['speedup'] * (1 - c['s_union']):.2f} |"
            for c in crossover
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
