"""Probe: variants of the one-row kernel's accumulating rules, in a decode chain and per call.

Each variant's overrides replace ``_row_defaults``' block sizes for every call kind; times
Llama-3-8B's decode chain (q/k/v, o, gate/up, down with SiLU; 8 layers, CUDA graphs) at
s = 0 / 0.5 / 0.9 and each call kind at 0.5, after checking the chain against the
non-accumulating path. Session 10 asked whether the mid and small weights starve for bytes in
flight (the down projection has half gate/up's programs per SM and streams 2.7 against 3.3 TB/s
at 50%): more programs per SM, narrower N-blocks, larger or smaller tiles; then 32-row tiles
with grids small enough for one wave at their ~8 one-warp programs per SM.

    PYTHONPATH=. python bench/probe/gemv_rules.py [--layers 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import unittest.mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gemv_accum as ga  # noqa: E402

from fxsparse.kernels import sparse_gemv as sg  # noqa: E402
from fxsparse.kernels.timing import gpu_environment, time_calls  # noqa: E402


def _session10(n: int, k: int, elem_size: int) -> dict:
    """The accumulating rule before the stream rule: one warp, 32-row tiles, 8 programs per SM."""
    return dict(num_warps=1, block_n=256 // elem_size, acc_tile=False, epi_floats=64, sub_k=32,
                chunk_k=128 if n * k < sg._SMALL_WEIGHT else 256, programs_per_sm=8, one_step_max=256,
                scratch_group=8, stages=0, tile_bytes=0, max_split=64, atomic_epilogue=False)


VARIANTS = {  # run 1: pps24 ... c512 (results/gemv_rules_h200.md); run 2: 32-row tiles in one wave
    # (gemv_rules2_h200.md); run 3 (session 11): the stream rule against session 10's
    "default": {},
    "session10": _session10,
    "bn1024": dict(block_n=1024),
    "pps2": dict(programs_per_sm=2),
    "bn1024pps2": dict(block_n=1024, programs_per_sm=2),
    "st3": dict(stages=3),
}
KINDS = ("qkv", "o", "gu", "d")


def patched(over):
    base = sg._row_defaults

    def rows(n, k, elem_size, accumulate=False, deterministic=False):
        if callable(over):
            return over(n, k, elem_size)
        return {**base(n, k, elem_size, accumulate, deterministic), **over}
    return unittest.mock.patch.object(sg, "_row_defaults", rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    env = gpu_environment()
    print(env, flush=True)
    ws = ga.build(args.layers)
    x = torch.randn(1, ga.H, device=ga.DEV, dtype=ga.DT)
    calls = 4 * args.layers
    res: dict[str, dict] = {}
    for name, over in VARIANTS.items():
        sg._block_config.cache_clear()
        with patched(over):
            r = res[name] = {}
            for s in (0.0, 0.5, 0.9):
                _, accumulate, dense, errs = ga.chains(ws, x, s)
                if not all(e < 2e-2 for e in errs):
                    sys.exit(f"!!!! MISMATCH {name} s={s}: {errs}")
                r[f"chain_{s}"] = time_calls([accumulate], graphs=True)[0] / calls
                if name == "default":
                    r[f"dense_{s}"] = time_calls([dense], graphs=True)[0] / calls
            for kind, (_, acc) in ga.single_calls(ws, x, 0.5).items():
                r[kind] = time_calls(acc, graphs=True)[0]
        print(name, {k: round(v, 2) for k, v in r.items()}, flush=True)
    sg._block_config.cache_clear()
    head = ("| variant | chain s=0 | chain s=0.5 | chain s=0.9 | "
            + " | ".join(f"{k} @0.5" for k in KINDS) + " |")
    lines = [f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {args.layers} layers; "
             "accumulating one-row calls, µs per call (chain: average of the 4 calls per layer); "
             f"cuBLAS chain {res['default']['dense_0.0']:.2f} µs per call", "", head,
             "|---" * (4 + len(KINDS)) + "|"]
    for name, r in res.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[f'chain_{s}']:.2f}" for s in (0.0, 0.5, 0.9))
                     + " | " + " | ".join(f"{r[k]:.2f}" for k in KINDS) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        variants = {k: str(v) for k, v in VARIANTS.items()}
        (args.out / "gemv_rules.json").write_text(json.dumps(dict(env=env, variants=variants, rows=res),
                                                                indent=1))
        (args.out / "gemv_rules.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
