"""Compiled vs eager sparse: how far a compiled model's decisions and logits are from eager's.

A tiny random Llama (hidden 1024, 4 layers by default), a plan at 50% on all seven projections
or on the MLP ones, one token per row. Per setting: the relative logit error of the compiled
model (``sparse_act``, CUDA graphs on CUDA) against the eager hooks reference
(``fxsparse.reference``) over ``--tokens`` calls, how often their argmax agrees, and the
fraction of keep decisions unlike eager's (``fxsparse.keep_agreement``, first call). Writes a
markdown table and JSON::

    PYTHONPATH=. python bench/parity.py --out $OUT/parity_h100
    PYTHONPATH=. python bench/parity.py --device cpu --hidden 256 --tokens 4 --out /tmp/parity
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fxsparse
from fxsparse import IgnoredScope, TargetScope
from fxsparse.reference import plan_hooks

PATTERNS = {"all": r".*(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj", "mlp": r".*mlp\.(gate|up|down)_proj"}
SETTINGS = {  # label -> backend options
    "emulate_precision_casts off": {"emulate_precision_casts": False},
    "default": {},
    "default, fuse_activations off": {"fuse_activations": False},
    "default, accumulate off": {"accumulate": False},
    "default, both off": {"fuse_activations": False, "accumulate": False},
    "no Inductor": {"inductor": False},
}


def model_and_plan(hidden: int, layers: int, pattern: str, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=int(hidden * 3.5) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128,
                      num_key_value_heads=max(1, hidden // 512), max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 512, (2, 64), generator=g) for _ in range(4)]
    plan = fxsparse.calibrate(model, data, {TargetScope(patterns=[pattern]): 0.5},
                              IgnoredScope(names=["lm_head"]), progress=False)
    model = model.to(device=device, dtype=dtype)
    if device == "cuda":
        fxsparse.prepare_weights(model, plan, dense_when_faster=False)
    return model, plan


@torch.no_grad()
def measure(model, plan, rows: int, tokens: int, options: dict, device: str) -> dict:
    opts = {"dense_when_faster": False, **options}
    if device == "cuda" and opts.get("inductor", True):
        opts.setdefault("mode", "reduce-overhead")
    torch.compiler.reset()
    fast = torch.compile(model, backend="sparse_act", options={"plan": plan, **opts})
    g = torch.Generator().manual_seed(rows)
    errs, agree = [], 0
    xs = [torch.randint(0, 512, (rows, 1), generator=g).to(device) for _ in range(tokens)]
    for x in xs:
        got = fast(x, use_cache=False).logits.float().clone()
        with plan_hooks(model, plan):
            want = model(x, use_cache=False).logits.float()
        errs.append(float((got - want).norm() / want.norm()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
    differ = fxsparse.keep_agreement(model, xs[0], plan=plan, options=opts)
    fr = [d["fraction"] for d in differ.values()]
    return {"rel_err": sum(errs) / len(errs), "max_rel_err": max(errs),
            "argmax_agree": agree / (rows * tokens), "keep_differ_max": max(fr),
            "keep_differ_mean": sum(fr) / len(fr)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    # (pattern, dtype, rows, settings): every setting at one row; the default and its
    # counterpart elsewhere
    cases = [(p, torch.bfloat16, 1, list(SETTINGS)) for p in PATTERNS]
    cases += [(p, torch.float16, 1, ["emulate_precision_casts off", "default"]) for p in PATTERNS]
    cases += [("all", torch.bfloat16, r, ["emulate_precision_casts off", "default"]) for r in (2, 4)]
    rows_out = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = args.device
    import transformers
    import triton

    head = (f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}, "
            f"triton {triton.__version__}, transformers {transformers.__version__}")
    models = {}
    for pattern, dtype, rows, labels in cases:
        key = (pattern, dtype)
        if key not in models:
            models[key] = model_and_plan(args.hidden, args.layers, PATTERNS[pattern], dtype, dev)
        model, plan = models[key]
        for label in labels:
            t = time.perf_counter()
            try:
                r = measure(model, plan, rows, args.tokens, SETTINGS[label], dev)
            except Exception as e:  # noqa: BLE001 - a failing setting is a row, not a lost run
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            r.update(projections=pattern, dtype=str(dtype).split(".")[1], rows=rows, setting=label)
            rows_out.append(r)
            print(f"{pattern} {r['dtype']} rows={rows} {label}: "
                  + (r.get("error") or f"err {r['rel_err']:.2e} argmax {r['argmax_agree']:.0%} "
                     f"keep-differ max {r['keep_differ_max']:.2e}") + f" ({time.perf_counter() - t:.0f} s)",
                  flush=True)
            write(out, head, args, rows_out)


def write(out: Path, head: str, args, rows: list[dict]) -> None:
    lines = ["# compiled vs eager sparse decode", "", f"* {head}",
             f"* tiny random Llama, hidden {args.hidden}, {args.layers} layers, plan at 50% on the "
             f"listed projections, {args.tokens} calls of one token per row; CUDA graphs on CUDA "
             "(`reduce-overhead`), `dense_when_faster=False`",
             "* rel err: |compiled - eager| / |eager| of the logits (mean over calls); keep differ: "
             "fraction of a layer's keep decisions unlike eager's on the first call (worst layer, mean "
             "over layers)", "",
             "| projections | dtype | rows | setting | rel err | max rel err | argmax agree "
             "| keep differ max | keep differ mean |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['projections']} | {r['dtype']} | {r['rows']} | {r['setting']} | "
                         f"{r['error']} | | | | |")
            continue
        lines.append(f"| {r['projections']} | {r['dtype']} | {r['rows']} | {r['setting']} | "
                     f"{r['rel_err']:.2e} | {r['max_rel_err']:.2e} | {r['argmax_agree']:.0%} | "
                     f"{r['keep_differ_max']:.2e} | {r['keep_differ_mean']:.2e} |")
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out.with_suffix(".md"))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    tmp.replace(out.with_suffix(".json"))


if __name__ == "__main__":
    sys.exit(main())
