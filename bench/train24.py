"""GPU benchmark: squared-ReLU FFN forward+backward, dense vs 2:4 activations (docs/training.md).

    python bench/train24.py            # JSON + markdown to $OUT if set
    python bench/train24.py --large    # only T=16384, h=4096, i=16384
    python bench/train24.py --quick    # one small shape

Prints GPU, torch, triton and cuSPARSELt versions; checks correctness first (exits 1 on failure:
Triton kernels bit-exact vs the references, cuSPARSELt vs dense fp32, the op in bf16 vs fp32);
then times (medians, L2 flushed) the dense squared-ReLU FFN and the 2:4 op per method, forward
and forward+backward, and each part of the 2:4 path next to the dense matmuls it replaces.
Inputs are random, so ReLU^2 activations are ~50% sparse rather than a trained model's ~90%; the
2:4 path's cost does not depend on that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

from fxsparse import training as T
from fxsparse.kernels import prune24 as P
from fxsparse.kernels.compress24 import compress24
from fxsparse.kernels.timing import gpu_environment

TOKENS = (4096, 16384)
SHAPES = ((2048, 8192), (4096, 16384))
METHODS = ("naive", "mvue", "soft_threshold")
DEADLINE_S = 330.0  # stop timing new cases past this (the whole run must stay < 6 minutes)
T0 = time.perf_counter()


def env() -> dict:
    info = gpu_environment(0)
    print(" | ".join(f"{k} {v}" for k, v in info.items()))
    return info


def ms(fn, grads=None, rep=200) -> float:
    return float(do_bench(fn, warmup=50, rep=rep, grad_to_none=grads, return_mode="median"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# -- correctness ----------------------------------------------------------------------------


def check(name: str, ok: bool, detail: str, failures: list) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")
    if not ok:
        failures.append(name)


def correctness() -> list[str]:
    print("\ncorrectness")
    failures: list[str] = []
    g = torch.Generator(device="cuda").manual_seed(0)
    t, h, i = 1024, 512, 2048
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    c = torch.randn(h, device="cuda", generator=g)
    got, want = P.prune24(x, c), P.prune24_reference(x, c)
    check("prune24 triton == reference", torch.equal(got, want), "bitwise", failures)
    for m in ("naive", "soft_threshold"):
        out, cnt = P.sparsify24(x, m, relu2=True, count=True)
        ref = P.sparsify24_reference(torch.relu(x.float()).square(), m).bfloat16()
        err = float(((out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30)).max())
        same = err <= 2**-7 and torch.equal(cnt, (out != 0).sum(0, dtype=torch.int32))
        check(f"sparsify24 {m} vs reference", same, f"max err {err:.1e} (<= 1 bf16 ulp)", failures)
    out, _ = P.sparsify24(x, "mvue", relu2=True)
    check("sparsify24 mvue is 2:4", P.is_24(out), "pattern", failures)
    perm = T.token_permutation(t, "cuda")[0]
    dense = torch.rand(h, device="cuda", generator=g) < 0.05
    same = torch.equal(P.prune24_tokens_t(x, perm, dense), P.prune24_tokens_t_reference(x, perm, dense))
    check("prune24_tokens_t == reference", same, "bitwise", failures)

    a = P.sparsify24(torch.randn(t, i, device="cuda", generator=g).bfloat16(), "naive")[0]
    b = torch.randn(i, h, device="cuda", generator=g).bfloat16()
    supported = T.cslt_supported(a, b)
    # not fatal: without cuSPARSELt the 2:4 matmuls fall back to dense ones (timed as such)
    print(f"  [{'ok' if supported else 'WARN'}] cuSPARSELt usable: {supported}")
    if supported:
        ref = a.float() @ b.float()
        e1 = rel_err(T.mm24(a, b), ref)
        e2 = rel_err(T.mm24(a, b.t().contiguous().t()), ref)
        e3 = rel_err(T.mm24(a, b, transpose_result=True), ref.t())
        ok = max(e1, e2, e3) < 1e-2
        check("mm24 (cuSPARSELt) vs fp32", ok, f"rel err {e1:.1e} / {e2:.1e} / {e3:.1e}", failures)

    w1 = (torch.randn(i, h, device="cuda", generator=g) / h**0.5).bfloat16()
    w2 = (torch.randn(h, i, device="cuda", generator=g) / i**0.5).bfloat16()
    for m in METHODS:
        xs, w1s, w2s = (v.clone().requires_grad_() for v in (x, w1, w2))
        y, y1, y2s, counts, scale = torch.ops.fxsparse.squared_relu24_ffn(
            xs, w1s, w2s, torch.tensor(True), torch.tensor(math.nan), m, True, 1, 0.05, True, 0
        )
        e_fwd = rel_err(y, scale.item() * (y2s.float() @ w2.float().t()))
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (xs, w1s, w2s), dy)
        ref = torch.ops.fxsparse.squared_relu24_ffn_backward(
            *(v.detach().float() for v in (dy, x, w1, w2, y1, y2s)),
            counts,
            torch.tensor(True),
            scale,
            m,
            0.05,
            True,
            0,
        )
        errs = [rel_err(a, b) for a, b in zip(grads, ref, strict=True)]
        ok = P.is_24(y2s) and e_fwd < 2e-2 and max(errs) < 3e-2
        detail = f"fwd {e_fwd:.1e}, dx/dw1/dw2 " + "/".join(f"{e:.1e}" for e in errs)
        check(f"op {m} bf16 vs fp32 reference", ok, detail, failures)
    return failures


# -- timing ---------------------------------------------------------------------------------


def make(t: int, h: int, i: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, h, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    w1 = (torch.randn(i, h, device="cuda", generator=g) / h**0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(h, i, device="cuda", generator=g) / i**0.5).bfloat16().requires_grad_()
    dy = torch.randn(t, h, device="cuda", generator=g, dtype=torch.bfloat16)
    return x, w1, w2, dy


def time_op(x, w1, w2, dy, method: str | None) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of the op; ``method=None``: dense (warm-up) mode."""
    sparse = torch.tensor(method is not None)
    m = method or "naive"
    scale = torch.tensor(math.nan)
    if m == "soft_threshold" and method is not None:  # fix the scale once, as training does
        scale = T.squared_relu24_ffn(x, w1, w2, sparse, m, scale)[1]

    def fwd():
        return T.squared_relu24_ffn(x, w1, w2, sparse, m, scale)[0]

    def fwd_bwd():
        fwd().backward(dy)

    with torch.no_grad():
        f = ms(fwd)
    return f, ms(fwd_bwd, grads=[x, w1, w2])


def time_parts(x, w1, w2, dy, method: str) -> dict[str, float]:
    """Each step of the 2:4 path alone (ms), and the dense matmuls it replaces."""
    x, w1, w2 = x.detach(), w1.detach(), w2.detach()
    t, i = x.shape[0], w1.shape[0]
    y1 = x @ w1.t()
    y2s, counts = P.sparsify24(y1, method, relu2=True, count=True)
    dy2 = dy @ w2
    dy1 = P.relu2_grad24(dy2, y1, y2s, method == "mvue")
    dense = T.dense_feature_mask(counts, 0.05)
    idx = dense.nonzero().squeeze(1)
    perm = T.token_permutation(t, x.device)[0]
    z2 = P.prune24_tokens_t(y2s, perm, dense)
    dyp, xp = dy[perm], x[perm]
    p_y2s, p_dy1, p_z2 = (compress24(v) for v in (y2s, dy1, z2))
    parts = {
        "fwd: x@W1^T (dense, kept)": ms(lambda: x @ w1.t()),
        "fwd: ReLU^2 + 2:4 prune + counts (Triton)": ms(
            lambda: P.sparsify24(y1, method, relu2=True, count=True)
        ),
        "fwd: compress Y2s (compress24)": ms(lambda: compress24(y2s)),
        "  torch._cslt_compress, for comparison": ms(lambda: torch._cslt_compress(y2s)),
        "fwd: Y2s@W2^T sparse (cuSPARSELt)": ms(lambda: T.cslt_mm(p_y2s, t, w2.t())),
        "  dense equivalent Y2@W2^T": ms(lambda: y2s @ w2.t()),
        "bwd: dY3@W2 (dense, kept)": ms(lambda: dy @ w2),
        "bwd: mask + ReLU^2 grad (Triton)": ms(lambda: P.relu2_grad24(dy2, y1, y2s, method == "mvue")),
        "bwd: compress dY1": ms(lambda: compress24(dy1)),
        "bwd: dX = dY1@W1 sparse": ms(lambda: T.cslt_mm(p_dy1, t, w1)),
        "  dense equivalent dY1@W1": ms(lambda: dy1 @ w1),
        "bwd: split 95/5 (topk of counts)": ms(lambda: T.dense_feature_mask(counts, 0.05)),
        "bwd: token-wise 2:4 prune x2 (Triton)": 2 * ms(lambda: P.prune24_tokens_t(y2s, perm, dense)),
        "bwd: permute dY3 and X": ms(lambda: (dy[perm], x[perm])),
        "bwd: compress x2": 2 * ms(lambda: compress24(z2)),
        "bwd: dW2, dW1 sparse (95% features) x2": ms(lambda: T.cslt_mm(p_z2, i, dyp, transpose_result=True))
        + ms(lambda: T.cslt_mm(p_z2, i, xp)),
        "  dense equivalent dW2, dW1": ms(lambda: dy.t() @ y2s) + ms(lambda: dy1.t() @ x),
        "bwd: dense 5% features (gather + 2 matmuls)": ms(
            lambda: (dy.t() @ y2s.index_select(1, idx), dy1.index_select(1, idx).t() @ x)
        ),
    }
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small shape (smoke test)")
    ap.add_argument("--large", action="store_true", help="only T=16384, h=4096, i=16384 (the target)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/train24.py needs a CUDA GPU")
    info = env()
    failures = correctness()
    if failures:
        print(f"\ncorrectness FAILED: {failures}")
        sys.exit(1)

    tokens, shapes = (TOKENS, SHAPES) if not args.quick else ((4096,), ((1024, 4096),))
    if args.large:
        tokens, shapes = TOKENS[-1:], SHAPES[-1:]
    rows, parts_all = [], {}
    for h, i in shapes:
        for t in tokens:
            if time.perf_counter() - T0 > DEADLINE_S:
                print(f"deadline: skipping T={t} h={h} i={i}")
                continue
            x, w1, w2, dy = make(t, h, i)
            d_f, d_fb = time_op(x, w1, w2, dy, None)
            row = {"T": t, "h": h, "i": i, "dense_fwd_ms": d_f, "dense_fwd_bwd_ms": d_fb}
            print(f"\nT={t} h={h} i={i}: dense fwd {d_f:.3f} ms, fwd+bwd {d_fb:.3f} ms")
            for m in METHODS:
                f, fb = time_op(x, w1, w2, dy, m)
                row[f"{m}_fwd_ms"], row[f"{m}_fwd_bwd_ms"] = f, fb
                print(f"  {m:15s} fwd {f:8.3f} ms ({d_f / f:.2f}x)   fwd+bwd {fb:8.3f} ms ({d_fb / fb:.2f}x)")
            if t == max(tokens):
                parts = time_parts(x, w1, w2, dy, "mvue")
                parts_all[f"T={t},h={h},i={i}"] = parts
                print("  parts (mvue):")
                for k, v in parts.items():
                    print(f"    {k:45s} {v:8.3f} ms")
            rows.append(row)
            del x, w1, w2, dy
            torch.cuda.empty_cache()

    lines = [
        "| T | h | i | dense fwd+bwd ms | "
        + " | ".join(f"{m} fwd+bwd ms (x)" for m in METHODS)
        + " | "
        + " | ".join(f"{m} fwd (x)" for m in METHODS)
        + " |",
        "|---" * (4 + 2 * len(METHODS)) + "|",
    ]
    for r in rows:
        fb = " | ".join(
            f"{r[f'{m}_fwd_bwd_ms']:.2f} ({r['dense_fwd_bwd_ms'] / r[f'{m}_fwd_bwd_ms']:.2f}x)"
            for m in METHODS
        )
        f = " | ".join(f"{r['dense_fwd_ms'] / r[f'{m}_fwd_ms']:.2f}x" for m in METHODS)
        lines.append(f"| {r['T']} | {r['h']} | {r['i']} | {r['dense_fwd_bwd_ms']:.2f} | {fb} | {f} |")
    table = "\n".join(lines)
    big = [r for r in rows if r["T"] == max(tokens)]
    best = max((r["dense_fwd_bwd_ms"] / r[f"{m}_fwd_bwd_ms"] for r in big for m in METHODS), default=0.0)
    verdict = f"best fwd+bwd speedup at T={max(tokens)}: {best:.2f}x (target >= 1.2x)"
    print(f"\n{info['gpu']}, torch {info['torch']}, triton {info['triton']}, bf16\n")
    print(table)
    print(f"\n{verdict}; total {time.perf_counter() - T0:.0f} s")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        payload = {"env": info, "rows": rows, "parts_ms": parts_all, "verdict": verdict}
        Path(out, "train24.json").write_text(json.dumps(payload, indent=1))
        head = (f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}, "
                f"cuSPARSELt {info['cusparselt']}, bf16")
        Path(out, "train24.md").write_text(f"{head}\n\n{table}\n\n{verdict}\n")
        print(f"wrote {out}/train24.json and {out}/train24.md")


if __name__ == "__main__":
    main()
