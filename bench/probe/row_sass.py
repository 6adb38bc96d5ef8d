"""sm_90 SASS of the one-row GEMV kernel, compiled on any machine (no GPU needed).

Prints, per configuration, the registers per thread and, for the weight loop (the innermost
loop with 128-bit global loads), the order of global loads and FFMAs: whether a tile's loads
issue before the FMAs of the tile in hand is what "tiles in flight" means in SASS. The local
Triton need not be the device's: 3.9 gives the small rule 167 registers, 3.6 on the lent H200
108-112 (session 7), so check counts against ``bench/gemv.py --sweep``'s printout.

    python bench/probe/row_sass.py [--weights int8|fp8] [NxK ...]      (default: the decode shapes)

``--weights``: 8-bit weights with scales (1-byte elements, so 4096-column blocks); also counts
the weight loop's conversion instructions (I2F, F2FP, PRMT, I2I, HADD2.F32) per FFMA.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fxsparse.kernels import sparse_gemv as sg

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


WEIGHT_PTR = {None: "*bf16", "int8": "*i8", "fp8": "*fp8e4nv"}


def compile_row(cfg: sg.GemvConfig, members: int = 1, pdl: bool = False, accumulate: bool = True,
                weights: str | None = None):
    fn = sg._row_gemv_kernel
    const = dict(NUM_W=members, XDT=tl.bfloat16, QUANT=weights is not None, BLOCK_R=cfg.block_r,
                 USE_DOT=cfg.use_dot, DOT_FP32=weights is not None,
                 CENTER_MODE=0, HAS_SCALE=False, HAS_BIAS=False,
                 HAS_CB=False,
                 BLOCK_N=cfg.block_n, CHUNK_K=cfg.chunk_k, SUB_K=cfg.sub_k,
                 SPLIT_GROUP=sg._split_group(cfg, 1), ACC_TILE=cfg.acc_tile, PDL=pdl, ACT=0, GATED=False,
                 ACCUM=accumulate, ZERO=accumulate, STAGES=cfg.stages,
                 ATOMIC_EPI=cfg.atomic_epilogue and not accumulate,
                 # column-major weights: launches pass stride 1, which Triton's JIT specialises
                 stride_wn0=1, stride_wn1=1, stride_wn2=1, stride_sc0=1, stride_sc1=1, stride_sc2=1)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            if name in ("ws_ptr", "scr_ptr") or name.startswith("wsc"):
                sig[name] = "*fp32"
            elif name == "cnt_ptr":
                sig[name] = "*i32"
            else:
                sig[name] = WEIGHT_PTR[weights] if name in ("w0_ptr", "w1_ptr", "w2_ptr") else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "threshold":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            unspecialised = ("stride_xk", "stride_xmk", "split_k", "steps", "scr_group", "R", "stride_xr",
                             "stride_xmr")
            if name not in unspecialised:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, launch_pdl=pdl))


def sass(ck) -> tuple[str, int]:
    """The SASS text and registers per thread."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        run = lambda *a: subprocess.run([str(BIN / "cuobjdump"), *a, f.name], capture_output=True,
                                        text=True, check=True).stdout
        regs = int(re.search(r"REG:(\d+)", run("-res-usage")).group(1))
        return run("-sass"), regs


def loop_order(text: str) -> str:
    """Global loads (L) and FFMAs (F) of the weight loop, run-length coded."""
    lines = [ln for ln in text.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", ln)]
    ops = []
    for ln in lines:
        if "LDG.E.128" in ln or "LDG.E.64" in ln or ("LDG" in ln and "LDG.E " in ln):
            ops.append("L")
        elif "FFMA" in ln or "HFMA" in ln:
            ops.append("F")
        elif re.search(r"\bBRA\b", ln):
            ops.append("|")
    s = "".join(ops)
    run = lambda m: m.group(0) if len(m.group(0)) == 1 else f"{m.group(0)[0]}{len(m.group(0))}"
    return re.sub(r"(L+|F+)", run, s)


def conversions(text: str) -> str:
    """Conversion-type instructions of the kernel per FFMA (what 8-bit tiles add to the loop)."""
    ffma = max(1, text.count("FFMA"))
    names = ("I2F", "F2FP", "PRMT", "I2I", "HADD2.F32", "IADD3", "FADD")
    return ", ".join(f"{m} {text.count(m) / ffma:.2f}" for m in names)


def main() -> None:
    args = sys.argv[1:]
    weights = None
    if args[:1] == ["--weights"]:
        weights, args = args[1], args[2:]
    elem = 2 if weights is None else 1
    shapes = [tuple(map(int, a.split("x"))) for a in args] or [
        (4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]
    for n, k in shapes:
        for acc, det in ((True, False), (False, False), (False, True)):  # accumulating, op, deterministic op
            cfg = sg._pick_config(1, n, k, elem, 132, accumulate=acc, deterministic=det)
            text, regs = sass(compile_row(cfg, accumulate=acc, weights=weights))
            print(f"{n}x{k} accumulate={acc} deterministic={det} "
                  f"warps={cfg.num_warps} block_n={cfg.block_n} sub_k={cfg.sub_k} stages={cfg.stages}: "
                  f"{regs} registers, {text.count('BAR.SYNC')} BAR.SYNC, {text.count('MEMBAR')} MEMBAR")
            print("   ", loop_order(text))
            if weights:
                print("    per FFMA:", conversions(text))
        for rows, dot, bn in ((2, False, None), (4, False, None), (4, True, 1024), (16, True, 1024)):
            if weights and rows > 2:
                continue  # the op sends 1-2 rows of 8-bit weights to the kernel
            cfg = sg._pick_config(rows, n, k, elem, 132, deterministic=False, row_kernel=True, row_dot=dot,
                                  **({"block_n": bn} if bn else {}))
            text, regs = sass(compile_row(cfg, accumulate=False, weights=weights))
            print(f"{n}x{k} rows={rows} dot={cfg.use_dot} warps={cfg.num_warps} block_n={cfg.block_n} "
                  f"sub_k={cfg.sub_k} stages={cfg.stages}: {regs} registers, "
                  f"{text.count('BAR.SYNC')} BAR.SYNC, {text.count('HMMA')} HMMA")
            print("   ", loop_order(text))


if __name__ == "__main__":
    main()
