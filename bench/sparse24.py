"""2:4 activation prefill benchmark: dense cuBLAS vs prune + compress + sparse matmul.

For (N, K) in {(14336, 4096), (4096, 14336)} and rows M from 256 to 16384, bf16, medians of
back-to-back eager calls timed with CUDA events (``--graphs``: CUDA-graph replays), inputs rotated
past L2: dense ``F.linear``; ``prune24`` and ``compress24`` alone; torch's
``_sparse_semi_structured_tile``; the sparse matmul alone; ``sparse24_linear`` in total; the
dispatching ``fxsparse::prefill_linear`` with the crossover measured in this run (in a temporary
cache; ``--use-cache`` uses the user's); and the compress step against its byte floor (read x,
write half of it plus metadata, at the copy bandwidth measured here). A correctness check runs
first. Prints the environment and a markdown table, writes ``<name>.json`` and ``<name>.md``.

    PYTHONPATH=. python bench/sparse24.py --graphs --out bench/results [--name sparse24_h100] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fxsparse.kernels import timing

SHAPES = [(14336, 4096), (4096, 14336)]
ROWS = [256, 1024, 2048, 4096, 8192, 16384]
DT = torch.bfloat16
DECODE_ROWS = 16
L2_BYTES = 50e6


def env() -> dict:
    from fxsparse.kernels import sparse24 as S

    info = {**timing.gpu_environment(0), "sparse24_impl": S.SPARSE24_IMPL}
    print(" | ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    return info


# -- timing -------------------------------------------------------------------------------------

_MODE = {"graphs": False}  # --graphs: replay CUDA graphs (no launch overhead) instead of events


def time_calls(calls, trials: int = 5, min_ms: float = 10.0, eager: bool = False) -> float:
    """Median µs per call: CUDA-graph replays of all ``calls`` (events if capture fails)."""
    if eager or not _MODE["graphs"]:
        return timing.time_calls(calls, trials, min_ms)[0]
    try:
        return timing.time_calls(calls, trials, min_ms, graphs=True)[0]
    except Exception as e:  # noqa: BLE001 - some library call is not capturable: time eagerly
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]}; timing with events)")
        _MODE["graphs"] = False
        torch.cuda.synchronize()
        return timing.time_calls(calls, trials, min_ms)[0]


def copies(m: int, k: int, gen) -> list[torch.Tensor]:
    """Enough input copies that a pass over them spans 2x L2 (at most 16, at least 2)."""
    size = m * k * 2
    count = max(2, min(16, math.ceil(2 * L2_BYTES / size)))
    return [torch.randn(m, k, device="cuda", generator=gen).to(DT) for _ in range(count)]


# -- correctness --------------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def correctness_check() -> None:
    from fxsparse.kernels import prune24 as P
    from fxsparse.kernels import sparse24 as S
    from fxsparse.kernels.crossover import NEVER
    from fxsparse.kernels.prefill_linear import branch, prefill_linear_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    bad = []
    for n, k in [(1024, 512), *SHAPES]:
        for m in (200, 256) if n * k < 2**24 else (256,):
            x = torch.randn(m, k, device="cuda", generator=gen).to(DT)
            x[0, 0], x[0, 1] = x[0, 2], x[0, 2]  # ties
            w = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(DT)
            for center in (None, "vector"):
                c = None if center is None else 0.2 * torch.randn(k, device="cuda", generator=gen)
                for bias in (None, torch.randn(n, device="cuda", generator=gen).to(DT)):
                    pruned = P.prune24_reference(x, c)
                    if not torch.equal(P.prune24_triton(x, c), pruned):
                        bad.append(("prune24 triton != reference", n, k, m, center))
                    ref = F.linear(pruned.double(), w.double(), None if bias is None else bias.double())
                    e = rel_err(S.sparse24_linear(x, w, bias, c, None), ref)
                    if not e < 1e-2:
                        bad.append(("sparse24_linear", n, k, m, center, bias is not None, e))
                    up = (x.double(), w.double(), None if bias is None else bias.double())
                    for decode, m24 in ((DECODE_ROWS, 1), (DECODE_ROWS, NEVER), (m, 1)):
                        out = torch.ops.fxsparse.prefill_linear(x, w, bias, 0.5, c, None, None, decode, m24)
                        # 2:4 ranks around the center in x's dtype, the threshold mask in float32
                        c_ref = c if c is None or branch(m, decode, m24) != "2:4" else c.to(DT).double()
                        want = prefill_linear_reference(*up, 0.5, c_ref, None, None, decode, m24)
                        e = rel_err(out, want)
                        if not e < 1e-2:
                            bad.append(("prefill_linear", n, k, m, center, decode, m24, e))
        # the compressed layout round-trips through the sparse matmul exactly (identity weight)
        x = torch.randn(256, k, device="cuda", generator=gen).to(DT)
        eye = torch.eye(k, device="cuda", dtype=DT)
        back = S.sparse_mm24(S.compress24(x), 256, eye)
        if not torch.equal(back, P.prune24_reference(x)):
            bad.append(("compress24 round trip", k))
    torch.cuda.synchronize()
    if bad:
        print("!!!!!!!! CORRECTNESS CHECK FAILED !!!!!!!!")
        for b in bad:
            print("   ", b)
        sys.exit(1)
    print("correctness check: OK (prune24 bitwise, sparse24_linear and prefill_linear vs fp64, "
          "compress round trip)", flush=True)


# -- one shape ----------------------------------------------------------------------------------


def measure_shape(n: int, k: int, rows: list[int], m24: int, bw: float, gen) -> list[dict]:
    from fxsparse.kernels import prune24 as P
    from fxsparse.kernels import sparse24 as S
    from fxsparse.kernels.prefill_linear import branch

    w = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(DT)
    out = []
    for m in rows:
        xs = copies(m, k, gen)
        r: dict = {"n": n, "k": k, "m": m}
        r["dense_us"] = time_calls([lambda x=x: F.linear(x, w) for x in xs])
        r["prune24_us"] = time_calls([lambda x=x: P.prune24_triton(x) for x in xs])
        r["compress24_us"] = time_calls([lambda x=x: S.compress24(x) for x in xs])
        try:
            r["torch_tile_us"] = time_calls([lambda x=x: torch._sparse_semi_structured_tile(
                x, algorithm="", use_cutlass=False) for x in xs])
        except Exception as e:  # noqa: BLE001 - not every build has it for this layout
            r["torch_tile_us"], r["torch_tile_error"] = None, f"{type(e).__name__}: {str(e)[:100]}"
        packed = [S.compress24(x) for x in xs]
        r["sparse_mm_us"] = time_calls([lambda p=p, m=m: S.sparse_mm24(p, m, w) for p in packed])
        del packed
        r["total24_us"] = time_calls([lambda x=x: S.sparse24_linear(x, w) for x in xs])
        op = torch.ops.fxsparse.prefill_linear.default
        call = [lambda x=x, op=op: op(x, w, None, 0.0, None, None, None, DECODE_ROWS, m24) for x in xs]
        r["branch"] = branch(m, DECODE_ROWS, m24)
        r["dispatch_us"] = time_calls(call)
        r["dispatch_vs_dense"] = r["dense_us"] / r["dispatch_us"]
        r["total24_vs_dense"] = r["dense_us"] / r["total24_us"]
        if _MODE["graphs"]:
            r["dense_eager_us"] = time_calls([lambda x=x: F.linear(x, w) for x in xs], eager=True)
            r["dispatch_eager_us"] = time_calls(call, eager=True)
        else:
            r["dense_eager_us"], r["dispatch_eager_us"] = r["dense_us"], r["dispatch_us"]
        r["dispatch_eager_vs_dense"] = r["dense_eager_us"] / r["dispatch_eager_us"]
        floor_bytes = m * k * 2 + m * k + m * k / 8
        r["floor_us"] = floor_bytes / (bw * 1e12) * 1e6
        r["compress_of_floor"] = r["floor_us"] / r["compress24_us"]
        r["prune24_of_floor"] = r["floor_us"] / r["prune24_us"]
        out.append(r)
        tile = "-" if r["torch_tile_us"] is None else f"{r['torch_tile_us']:.1f}"
        print(f"  N={n} K={k} M={m}: dense {r['dense_us']:.1f} | prune {r['prune24_us']:.1f} | "
              f"compress24 {r['compress24_us']:.1f} | torch tile {tile} | mm {r['sparse_mm_us']:.1f} | "
              f"total {r['total24_us']:.1f} ({r['total24_vs_dense']:.2f}x) | dispatch[{r['branch']}] "
              f"{r['dispatch_us']:.1f} ({r['dispatch_vs_dense']:.3f}x; "
              f"eager {r['dispatch_eager_vs_dense']:.3f}x) | compress at {100 * r['compress_of_floor']:.0f}% "
              "of floor", flush=True)
        del xs
        torch.cuda.empty_cache()
    return out


def markdown(info: dict, bw: float, crossovers: dict, rows: list[dict], mode: str) -> str:
    from fxsparse.kernels.crossover import NEVER

    lines = [
        f"# 2:4 activation prefill, {info['gpu']}",
        "",
        " | ".join(f"{k} {v}" for k, v in info.items()) + f" | copy {bw:.2f} TB/s | timing: {mode}",
        "",
        "µs per call, medians. total = prune + compress + sparse mm (`sparse24_linear`); dispatch =",
        f"`fxsparse::prefill_linear` with decode_rows={DECODE_ROWS} and the crossover measured in this run;",
        "floor = (M·K·2 + M·K + M·K/8) bytes at the copy bandwidth; `% floor` = floor / compress24.",
        "",
        "| N x K | M | dense | prune24 | compress24 | torch tile | sparse mm | total 2:4 | 2:4 vs dense "
        "| branch | dispatch vs dense | eager op vs dense | compress % floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tile = "-" if r["torch_tile_us"] is None else f"{r['torch_tile_us']:.1f}"
        lines.append(
            f"| {r['n']}x{r['k']} | {r['m']} | {r['dense_us']:.1f} | {r['prune24_us']:.1f} | "
            f"{r['compress24_us']:.1f} | {tile} | {r['sparse_mm_us']:.1f} | {r['total24_us']:.1f} | "
            f"{r['total24_vs_dense']:.2f}x | {r['branch']} | {r['dispatch_vs_dense']:.3f}x | "
            f"{r['dispatch_eager_vs_dense']:.3f}x | {100 * r['compress_of_floor']:.0f}% |")
    lines.append("")
    for (n, k), c in crossovers.items():
        rows_txt = "never" if c["rows"] >= NEVER else str(c["rows"])
        lines.append(f"* crossover {n}x{k}: {rows_txt} (measured at M = {', '.join(c['times_us'])})")
    worst = min(r["dispatch_vs_dense"] for r in rows)
    lines.append(f"* dispatch vs dense, worst over all M: {worst:.3f}x "
                 f"({'meets' if worst >= 0.98 else 'MISSES'} the >= 0.98x bound)")
    worst_eager = min(r["dispatch_eager_vs_dense"] for r in rows)
    lines.append("* eager op (Python custom-op dispatch included) vs eager F.linear, worst: "
                 f"{worst_eager:.3f}x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"), help="folder for JSON + md")
    p.add_argument("--name", default="sparse24_h100", help="file stem of the results")
    p.add_argument("--quick", action="store_true", help="one shape, three row counts")
    p.add_argument("--graphs", action="store_true",
                   help="time CUDA-graph replays (no launch overhead) instead of back-to-back eager calls")
    p.add_argument("--use-cache", action="store_true",
                   help="read/write the user's crossover cache instead of measuring afresh")
    args = p.parse_args(argv)
    _MODE["graphs"] = args.graphs
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    import fxsparse  # noqa: F401  (registers the ops)
    from fxsparse.kernels import crossover as X
    from fxsparse.kernels import sparse24 as S

    info = env()
    if not S.available("cuda"):
        print("cuSPARSELt is not available here", file=sys.stderr)
        return 2
    correctness_check()
    bw = timing.copy_bandwidth()
    print(f"copy bandwidth {bw:.2f} TB/s", flush=True)
    shapes, rows = (SHAPES[:1], [256, 2048, 8192]) if args.quick else (SHAPES, ROWS)
    if not args.use_cache:
        os.environ["FXSPARSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxsparse_crossover_")
    gen = torch.Generator(device="cuda").manual_seed(1)
    crossovers, results = {}, []
    for n, k in shapes:
        t = time.perf_counter()
        m24 = X.crossover_rows(n, k, DT, "cuda", graphs=_MODE["graphs"])
        entry = json.loads(X.cache_path().read_text())["entries"]
        times = next((e["times_us"] for key, e in entry.items() if f"|n={n}|k={k}|" in key
                      and "epilogue=0" in key and "dtype=bfloat16" in key
                      and f"graphs={int(_MODE['graphs'])}" in key), {})
        crossovers[(n, k)] = {"rows": m24, "times_us": times}
        print(f"crossover {n}x{k}: {'never' if m24 >= X.NEVER else m24} "
              f"({time.perf_counter() - t:.1f} s; dense/2:4 µs per M: {times})", flush=True)
        results += measure_shape(n, k, rows, m24, bw, gen)
    mode = "CUDA graphs" if _MODE["graphs"] else "CUDA events (eager)"
    md = markdown(info, bw, crossovers, results, mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"env": info, "copy_tbs": bw, "timing": mode, "decode_rows": DECODE_ROWS,
            "crossover": {f"{n}x{k}": {**c, "rows": None if c["rows"] >= X.NEVER else c["rows"]}
                          for (n, k), c in crossovers.items()},
            "rows": results, "seconds": time.perf_counter() - t0}
    (out / f"{args.name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{args.name}.md").write_text(md)
    print()
    print(md)
    print(f"written: {out / (args.name + '.json')}, {out / (args.name + '.md')} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
