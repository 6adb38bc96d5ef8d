"""Probe: the one-row kernel's split-K epilogue against float32 accumulation.

With the split-K epilogue every program of a launch adds its partial, fences, bumps an arrival
counter, and the last one reloads the sums and writes the output: ~3 L2 round trips after the
weight loop, on the critical path of every call. With ``accumulate`` each program instead
adds its partial to a float32 output (relaxed atomics, nothing waits on them), and the
output's consumer rounds it; the zeros that output needs are written by the previous call.

Times Llama-3-8B's four decode calls per layer (q/k/v grouped, o, gate/up grouped, down with
the SiLU prologue) under CUDA graphs, one by one and as a chain of layers, both ways, with
cuBLAS alongside; checks the two agree first.

    PYTHONPATH=. python bench/probe/gemv_accum.py [--layers 8] [--sweep] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fxsparse.kernels import sparse_gemv as sg
from fxsparse.kernels.timing import gpu_environment, time_calls

DT = torch.bfloat16
H, KV, FF = (64, 16, 224) if os.environ.get("TRITON_INTERPRET") == "1" else (4096, 1024, 14336)  # smoke test
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def col_major(n: int, k: int) -> torch.Tensor:
    return (torch.randn(k, n, device=DEV, dtype=DT) * k**-0.5).t()


def quantile_abs(x: torch.Tensor, s: float) -> float:
    return float(torch.quantile(x.float().abs().flatten(), s)) if s > 0 else 0.0


def build(layers: int):
    return [dict(q=col_major(H, H), k=col_major(KV, H), v=col_major(KV, H), o=col_major(H, H),
                 g=col_major(FF, H), u=col_major(FF, H), d=col_major(H, FF)) for _ in range(layers)]


def chains(ws, x, s: float):
    """(current, accumulate, dense) lists of calls over all layers, and a check of the two."""
    tx = quantile_abs(x, s)
    g0, u0 = sg.threshold_gemv_group(x, [ws[0]["g"], ws[0]["u"]], [None, None], tx)
    h0 = F.silu(g0) * u0
    td = quantile_abs(h0, s)

    def current():
        for w in ws:
            sg.threshold_gemv_group(x, [w["q"], w["k"], w["v"]], [None] * 3, tx)
            sg.threshold_gemv(x, w["o"], None, tx)
            g, u = sg.threshold_gemv_group(x, [w["g"], w["u"]], [None, None], tx)
            sg.threshold_gemv_group(g, [w["d"]], [None], td, act="silu", x_mul=u)

    def accumulate():
        z = torch.zeros(1, H + 2 * KV, device=DEV)
        for w in ws:
            z = sg.threshold_gemv_group(x, [w["q"], w["k"], w["v"]], [None] * 3, tx,
                                        accumulate=z, zeros_next=H).view(1, H)
            z = sg.threshold_gemv_group(x, [w["o"]], [None], tx, accumulate=z,
                                        zeros_next=2 * FF).view(1, 2 * FF)
            gu = z
            z = sg.threshold_gemv_group(x, [w["g"], w["u"]], [None, None], tx, accumulate=gu,
                                        zeros_next=H).view(1, H)
            z = sg.threshold_gemv_group(gu[:, :FF], [w["d"]], [None], td, act="silu", x_mul=gu[:, FF:],
                                        accumulate=z, zeros_next=H + 2 * KV).view(1, H + 2 * KV)
        return z

    def dense():
        for w in ws:
            for name in "qkvogu":
                F.linear(x, w[name])
            F.linear(h0, w["d"])

    # check: one layer both ways
    w = ws[0]
    ref = [*sg.threshold_gemv_group(x, [w["q"], w["k"], w["v"]], [None] * 3, tx),
           sg.threshold_gemv(x, w["o"], None, tx)]
    ref += sg.threshold_gemv_group(x, [w["g"], w["u"]], [None, None], tx)
    acc_qkv = torch.zeros(1, H + 2 * KV, device=DEV)
    acc_o = sg.threshold_gemv_group(x, [w["q"], w["k"], w["v"]], [None] * 3, tx, accumulate=acc_qkv,
                                    zeros_next=H).view(1, H)
    acc_gu = sg.threshold_gemv_group(x, [w["o"]], [None], tx, accumulate=acc_o,
                                     zeros_next=2 * FF).view(1, 2 * FF)
    acc_d = sg.threshold_gemv_group(x, [w["g"], w["u"]], [None, None], tx, accumulate=acc_gu,
                                    zeros_next=H).view(1, H)
    sg.threshold_gemv_group(acc_gu[:, :FF], [w["d"]], [None], td, act="silu", x_mul=acc_gu[:, FF:],
                            accumulate=acc_d)
    # the down projection against the same (rounded) input: a flipped rounding of one sum moves
    # a channel across the threshold, which says nothing about the kernel
    ref += sg.threshold_gemv_group(acc_gu[:, :FF].to(DT), [w["d"]], [None], td, act="silu",
                                   x_mul=acc_gu[:, FF:].to(DT))
    got = [acc_qkv[:, :H], acc_qkv[:, H:H + KV], acc_qkv[:, H + KV:], acc_o, acc_gu[:, :FF],
           acc_gu[:, FF:], acc_d]
    errs = []
    for r, a in zip(ref, got, strict=True):
        a = a.to(DT).float()
        errs.append(float((a - r.float()).norm() / r.float().norm().clamp_min(1e-30)))
    return current, accumulate, dense, errs


def single_calls(ws, x, s: float):
    """Per kind of call: (current, accumulate) callables over the layers' weights."""
    tx = quantile_abs(x, s)
    out = {}
    accs = {name: torch.zeros(1, n, device=DEV) for name, n in
            (("qkv", H + 2 * KV), ("o", H), ("gu", 2 * FF), ("d", H))}
    g = torch.randn(1, FF, device=DEV, dtype=DT)
    u = torch.randn(1, FF, device=DEV, dtype=DT)
    td = quantile_abs(F.silu(g) * u, s)
    g32, u32 = g.float(), u.float()
    out["qkv"] = ([lambda w=w: sg.threshold_gemv_group(x, [w["q"], w["k"], w["v"]], [None] * 3, tx)
                   for w in ws],
                  [lambda w=w: sg.threshold_gemv_group(x, [w["q"], w["k"], w["v"]], [None] * 3, tx,
                                                       accumulate=accs["qkv"]) for w in ws])
    out["o"] = ([lambda w=w: sg.threshold_gemv(x, w["o"], None, tx) for w in ws],
                [lambda w=w: sg.threshold_gemv_group(x, [w["o"]], [None], tx, accumulate=accs["o"])
                 for w in ws])
    out["gu"] = ([lambda w=w: sg.threshold_gemv_group(x, [w["g"], w["u"]], [None, None], tx) for w in ws],
                 [lambda w=w: sg.threshold_gemv_group(x, [w["g"], w["u"]], [None, None], tx,
                                                      accumulate=accs["gu"]) for w in ws])
    out["d"] = ([lambda w=w: sg.threshold_gemv_group(g, [w["d"]], [None], td, act="silu", x_mul=u)
                 for w in ws],
                [lambda w=w: sg.threshold_gemv_group(g32, [w["d"]], [None], td, act="silu", x_mul=u32,
                                                     accumulate=accs["d"]) for w in ws])
    return out


VARIANTS = {  # overrides of sparse_gemv._pick_config for the accumulating launches
    "default": {},
    "pps12": dict(programs_per_sm=12),
    "pps24": dict(programs_per_sm=24),
    "c128": dict(chunk_k=128),
    "c512": dict(chunk_k=512, one_step_max=512),
    "w1": dict(num_warps=1, block_n=128, sub_k=16, acc_tile=False, epi_floats=64),
    "w2": dict(num_warps=2, block_n=64, sub_k=8, acc_tile=True, epi_floats=64),
    "c128pps24": dict(chunk_k=128, programs_per_sm=24),
    "w1c128": dict(num_warps=1, block_n=128, sub_k=16, acc_tile=False, epi_floats=64, chunk_k=128),
}


def sweep(ws, x, s: float) -> dict:
    """µs per accumulating call of each kind under each variant's block sizes."""
    tx = quantile_abs(x, s)
    g = torch.randn(1, FF, device=DEV)
    u = torch.randn(1, FF, device=DEV)
    td = quantile_abs(F.silu(g.to(DT)) * u.to(DT), s)
    kinds = {  # (members, input, multiplier, threshold, n, k)
        "qkv": (("q", "k", "v"), x, None, tx, H + 2 * KV, H), "o": (("o",), x, None, tx, H, H),
        "gu": (("g", "u"), x, None, tx, 2 * FF, H), "d": (("d",), g, u, td, H, FF)}
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    out = {}
    for kind, (names, xin, xm, thr, n, k) in kinds.items():
        acc = torch.zeros(1, n, device=DEV)
        for vname, over in VARIANTS.items():
            cfg = sg._pick_config(1, n, k, 2, nsm, **over)
            calls = [functools.partial(sg.threshold_gemv_group, xin, [w[m] for m in names],
                                       [None] * len(names), thr, config=cfg, x_mul=xm,
                                       act="silu" if xm is not None else None, accumulate=acc) for w in ws]
            out[f"{kind}:{vname}"] = time_calls(calls, graphs=True)[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sweep", action="store_true", help="also time block-size variants")
    args = ap.parse_args()
    torch.manual_seed(0)
    env = gpu_environment()
    print(env)
    ws = build(args.layers)
    x = torch.randn(1, H, device=DEV, dtype=DT)
    rows, table = [], []
    for s in (0.0, 0.5, 0.9):
        current, accumulate, dense, errs = chains(ws, x, s)
        print(f"s={s}: accumulate vs current, relative error per output {[f'{e:.1e}' for e in errs]}")
        if not all(e < 2e-2 for e in errs):
            sys.exit("!!!! MISMATCH")
        calls = 4 * args.layers
        t_cur, sp_cur = time_calls([current], graphs=True)
        t_acc, sp_acc = time_calls([accumulate], graphs=True)
        t_den, _ = time_calls([dense], graphs=True)
        row = dict(s=s, chain_current_us=t_cur / calls, chain_accumulate_us=t_acc / calls,
                   chain_dense_per_layer_us=t_den / args.layers, spread=(sp_cur, sp_acc))
        for kind, (cur, acc) in single_calls(ws, x, s).items():
            row[f"{kind}_current_us"] = time_calls(cur, graphs=True)[0]
            row[f"{kind}_accumulate_us"] = time_calls(acc, graphs=True)[0]
        rows.append(row)
        table.append(f"| {s} | {row['chain_current_us']:.2f} | {row['chain_accumulate_us']:.2f} | "
                     f"{row['chain_dense_per_layer_us'] / 4:.2f} | " + " | ".join(
                         f"{row[k + '_current_us']:.2f} / {row[k + '_accumulate_us']:.2f}"
                         for k in ("qkv", "o", "gu", "d"))
                     + " |")
    sweeps = {s: sweep(ws, x, s) for s in (0.5, 0.9)} if args.sweep else {}
    if sweeps:
        table.append("")
        table.append("Accumulating calls, µs per variant (s = 0.5 / 0.9): " + ", ".join(VARIANTS))
        table.append("")
        table.append("| call | " + " | ".join(VARIANTS) + " |")
        table.append("|---|" + "---|" * len(VARIANTS))
        for kind in ("qkv", "o", "gu", "d"):
            table.append(f"| {kind} | " + " | ".join(
                f"{sweeps[0.5][f'{kind}:{v}']:.2f} / {sweeps[0.9][f'{kind}:{v}']:.2f}"
                for v in VARIANTS) + " |")
    head = ("| s | chain µs/call, current | chain, accumulate | cuBLAS chain µs per 1/4 layer | "
            "q/k/v cur / acc | o | gate/up | down |\n|---|---|---|---|---|---|---|---|")
    text = (f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {args.layers} layers\n\n"
            + head + "\n" + "\n".join(table))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gemv_accum.json").write_text(json.dumps(
            dict(env=env, rows=rows, sweep={str(k): v for k, v in sweeps.items()}), indent=1))
        (args.out / "gemv_accum.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
