"""Quick H100 check of compress24 against its byte floor and torch's paths.

    PYTHONPATH=. python bench/probe/compress24_time.py
"""
import torch
from triton.testing import do_bench

from fxsparse.kernels.compress24 import compress24
from fxsparse.kernels.prune24 import prune24_triton


def us(fn) -> float:
    return do_bench(fn, return_mode="median") * 1e3


def copy_tbps() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (us(lambda: b.copy_(a)) * 1e-6) / 1e12


def main() -> None:
    bw = copy_tbps()
    print(f"copy {bw:.2f} TB/s")
    for m, k in [(16384, 4096), (16384, 14336), (8192, 4096), (16384, 16384)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = torch._cslt_compress(prune24_triton(x))
        same = torch.equal(compress24(x).view(-1).view(torch.int16), ref.view(-1).view(torch.int16))
        floor = (m * k * 2 + m * k + m * k / 8) / (bw * 1e12) * 1e6
        row = [f"{m}x{k}", f"same={same}", f"floor {floor:.0f} us"]
        for bk, nw in [(32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8)]:
            t = us(lambda bk=bk, nw=nw, x=x: compress24(x, block_k=bk, num_warps=nw))
            row.append(f"bk{bk}/w{nw} {t:.0f} us ({floor / t:.2f})")
        t_torch = us(lambda x=x: torch._cslt_compress(prune24_triton(x)))
        t_tile = us(lambda x=x: torch._sparse_semi_structured_tile(x, algorithm="", use_cutlass=False))
        row += [f"prune24+_cslt_compress {t_torch:.0f} us", f"torch tile op {t_tile:.0f} us"]
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
