"""Where the sparse GEMV's time goes, program by program: an instrumented copy of the kernel.

The kernel's source is copied with timestamps inserted at its phase boundaries (start, end of
the masking/compaction phase, end of the weight loop, after the split-K arrival atomic, end).
Each program records ``%globaltimer`` (ns, comparable across SMs) and ``%clock64`` (SM cycles)
at each point; each mark takes a value of the phase it closes as input, so it cannot be
scheduled before that phase's loads have landed. The product kernel is untouched: the copy is
written to a temporary module and launched through ``threshold_gemv``'s own launch code.

Per shape and sparsity: the kernel's CUDA-graph time (untraced), the traced launch's span
(first start to last end), the start skew across programs, and each phase's median and max
over programs (µs, from cycles at the measured SM clock).

    PYTHONPATH=. python bench/probe/gemv_phases.py [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from fxsparse.kernels import sparse_gemv as sg
from fxsparse.kernels.timing import gpu_environment, time_calls

MARK = """
@triton.jit
def _mark(trace_ptr, pid_n, pid_k, n_blocks, dep, I: tl.constexpr):
    base = trace_ptr + (pid_k * n_blocks + pid_n).to(tl.int64) * 10 + 2 * I
    g = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64,
                                  is_pure=False, pack=1)
    c = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [dep], dtype=tl.int64,
                                  is_pure=False, pack=1)
    tl.store(base, g)
    tl.store(base + 1, c)
"""
PHASES = ["mask+compact", "weight loop", "partial+atomic", "last: reduce+store"]


def traced_kernel():
    """The kernel's source with marks inserted, compiled from a temporary module."""
    src = inspect.getsource(sg._threshold_gemv_kernel.fn)
    lines = src.splitlines()
    out = []
    for line in lines:
        if line == "):" and "trace_ptr" not in "".join(out):
            out.append("    trace_ptr,")
        if line.startswith("    # ---- phase 2"):
            out.append("    _mark(trace_ptr, pid_n, pid_k, tl.num_programs(0), n_kept, 1)")
        if line.startswith("    # ---- epilogue"):
            out.append(
                "    _mark(trace_ptr, pid_n, pid_k, tl.num_programs(0), "
                "tl.sum(tl.sum(part, axis=1), axis=0).to(tl.int32, bitcast=True), 2)"
            )
        out.append(line)
        if "pid_k = tl.program_id(1)" in line:
            out.append("    _mark(trace_ptr, pid_n, pid_k, tl.num_programs(0), pid_n, 0)")
        if "arrived = tl.atomic_add(" in line:
            indent = re.match(r"\s*", line).group(0)
            out.append(f"{indent}_mark(trace_ptr, pid_n, pid_k, tl.num_programs(0), arrived, 3)")
    out.append("    _mark(trace_ptr, pid_n, pid_k, tl.num_programs(0), pid_n, 4)")
    assert sum("_mark(" in ln for ln in out) == 5, "the kernel's phase markers moved: update this probe"
    module = (
        "import triton\nimport triton.language as tl\n"
        "from fxsparse.kernels.sparse_gemv import _compact, _kept_value, _store_out\n"
        + MARK
        + "\n\n"
        + "\n".join(out)
        + "\n"
    )
    path = Path(tempfile.mkdtemp()) / "traced_gemv.py"
    path.write_text(module)
    spec = importlib.util.spec_from_file_location("traced_gemv", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["traced_gemv"] = mod
    spec.loader.exec_module(mod)
    return mod._threshold_gemv_kernel


class _Shim:
    """Stands in for the kernel inside ``threshold_gemv``: launches the traced copy."""

    def __init__(self, kernel):
        self.kernel, self.buf = kernel, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.buf = torch.zeros(grid[0] * grid[1] * 10, dtype=torch.int64, device="cuda")
            return self.kernel[grid](*args, trace_ptr=self.buf, **kwargs)

        return launch


def analyse(traces: list[torch.Tensor], split_k: int) -> dict:
    spans, skews, phases, clocks = [], [], {p: [] for p in PHASES}, []
    for t in traces:
        t = t.view(-1, 5, 2).double().cpu()  # [programs, mark, (globaltimer, clock)]
        g, c = t[..., 0], t[..., 1]
        spans.append(float(g[:, 4].max() - g[:, 0].min()) / 1e3)
        skews.append(float(g[:, 0].max() - g[:, 0].min()) / 1e3)
        ghz = float(((c[:, 4] - c[:, 0]) / (g[:, 4] - g[:, 0]).clamp_min(1)).median())
        clocks.append(ghz)
        d = (c[:, 1:] - c[:, :-1]) / ghz / 1e3  # µs per phase per program
        for j, p in enumerate(PHASES):
            if split_k == 1 and j >= 2:
                continue
            phases[p].append((float(d[:, j].median()), float(d[:, j].max())))
    row = dict(
        span_us=statistics.median(spans), skew_us=statistics.median(skews), sm_ghz=statistics.median(clocks)
    )
    for p, v in phases.items():
        if v:
            row[p] = (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="4096x4096,14336x4096,28672x8192")
    ap.add_argument("--sparsities", default="0,0.5,0.9,1")
    ap.add_argument("--config", nargs="*", default=[], help="_pick_config overrides, e.g. step_k=512")
    args = ap.parse_args()
    overrides = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in args.config}
    env = gpu_environment()
    print(env, flush=True)
    traced = traced_kernel()
    real = sg._threshold_gemv_kernel
    rows = []
    for n, k in (tuple(map(int, sh.split("x"))) for sh in args.shapes.split(",")):
        copies = max(4, math.ceil(1.5e9 / (n * k * 2)))
        ws = [(torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * k**-0.5).t() for _ in range(copies)]
        nsm = torch.cuda.get_device_properties(0).multi_processor_count
        cfg = sg._pick_config(1, n, k, 2, nsm, row_kernel=False, **overrides)  # the row-generic kernel
        for s in map(float, args.sparsities.split(",")):
            xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
            thr = [math.inf if s >= 1 else float(torch.quantile(x.float().abs(), s)) for x in xs]
            calls = [
                lambda x=x, w=w, t=t, c=cfg: sg.threshold_gemv(x, w, None, t, config=c)
                for x, w, t in zip(xs, ws, thr, strict=True)
            ]
            graph_us = time_calls(calls, 5, 10.0, graphs=True)[0]
            shim = _Shim(traced)
            sg._threshold_gemv_kernel = shim
            try:
                traces = []
                for i, call in enumerate(calls * 2):
                    call()
                    if i >= len(calls):  # warm: compiled, weights rotated out of L2
                        traces.append(shim.buf.clone())
                torch.cuda.synchronize()
            finally:
                sg._threshold_gemv_kernel = real
            row = dict(
                n=n,
                k=k,
                s=s,
                graph_us=graph_us,
                programs=traces[0].numel() // 10,
                split_k=cfg.split_k,
                **analyse(traces, cfg.split_k),
            )
            rows.append(row)
            cells = "  ".join(f"{p} {row[p][0]:.2f}/{row[p][1]:.2f}" for p in PHASES if p in row)
            print(
                f"{n}x{k} s={s:.1f}: graph {graph_us:.1f} us, traced span {row['span_us']:.1f}, "
                f"start skew {row['skew_us']:.2f}, SM {row['sm_ghz']:.2f} GHz | median/max us: {cells}",
                flush=True,
            )
        del ws
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gemv_phases_h100.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
