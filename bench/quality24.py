"""What 2:4 activation pruning costs in quality on SmolLM2-135M (CPU reference path).

Each planned layer's input is pruned to 2:4 along its channels (the 2 entries of every 4 farthest
from the center are kept, the others set to it: ``fxsparse.kernels.prune24_reference``), applied
by forward-pre-hooks. Variants: down_proj inputs only, all MLP inputs (gate/up/down), and both
again with SCAP mode-centering (center = the layer input's median, from one observer pass over
the Lee calibration text). Perplexity on held-out enwiki windows, dense alongside.

    OMP_NUM_THREADS=2 python bench/quality24.py [--windows 8]   # writes bench/results/quality24_cpu.md
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from fxsparse import ActivationObserver, collect_statistics
from fxsparse.data import load_model, read_text, token_chunks
from fxsparse.evaluation import evaluate
from fxsparse.kernels import prune24_reference


@contextmanager
def prune_hooks(model, names, centers):
    modules = dict(model.named_modules())

    def hook_for(center):
        return lambda _m, args: (prune24_reference(args[0], center), *args[1:])

    handles = [modules[n].register_forward_pre_hook(hook_for(centers.get(n))) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--out", default="bench/results/quality24_cpu")
    args = ap.parse_args()
    model, tok = load_model()
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    down = sorted(n for n in names if n.endswith("mlp.down_proj"))
    mlp = sorted(n for n in names if ".mlp." in n)

    # medians of each MLP layer input, one calibration pass
    observers = {n: ActivationObserver(n, dict(model.named_modules())[n].in_features) for n in mlp}
    collect_statistics(model, token_chunks(tok, read_text("lee"), 256, args.calib_windows), observers)
    medians = {n: float(o.quantile(0.5)) for n, o in observers.items()}
    torch.compiler.reset()

    ids = tok(read_text("enwiki"), return_tensors="pt").input_ids[0]
    variants = {"2:4 down_proj": (down, {}), "2:4 all MLP inputs": (mlp, {}),
                "2:4 down_proj, median-centered": (down, medians),
                "2:4 all MLP inputs, median-centered": (mlp, medians)}
    rows, dense = [], None
    for label, (layers, centers) in variants.items():
        def sparse(chunk, layers=layers, centers=centers, **kw):
            with prune_hooks(model, layers, centers):
                return model(chunk, **kw)

        with torch.no_grad():
            res = evaluate(model, ids, window=256, max_windows=args.windows, sparse_model=sparse,
                           progress=False)
        dense = res.dense_ppl
        rows.append({"variant": label, "ppl": res.sparse_ppl, "agreement": res.agreement})
        print(f"{label:40s} ppl {res.sparse_ppl:8.3f} ({100 * (res.sparse_ppl / dense - 1):+.1f}%) "
              f"agreement {100 * res.agreement:.1f}%", flush=True)
    lines = ["# 2:4 activation pruning on SmolLM2-135M (CPU reference path)", "",
             f"{args.windows} x 256 enwiki tokens held out; medians from {args.calib_windows} x 256 "
             "Lee tokens. Command: `python bench/quality24.py`", "",
             "| variant | perplexity | vs dense | next-token agreement |", "|---|---|---|---|",
             f"| dense | {dense:.3f} | - | - |"]
    lines += [f"| {r['variant']} | {r['ppl']:.3f} | {100 * (r['ppl'] / dense - 1):+.1f}% | "
              f"{100 * r['agreement']:.1f}% |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"dense_ppl": dense, "rows": rows,
                                                    "medians": medians}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
