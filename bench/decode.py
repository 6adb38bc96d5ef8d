"""Decode speed, dense (Inductor) vs sparse_act: lean gpt-fast loop and HF generate.

Random-weight models built on the target device from a config (no hub access): ``llama3-8b``
(Llama-3-8B's shapes, ``--layers`` to cut), ``smollm2-135m`` and ``tiny`` (CPU smoke test). One
calibration pass (random-token prompts, all seven projections, ``lm_head`` dense) serves every
sparsity. A variant ``preset:loop:batch:sparsity`` (``--only`` / ``--skip`` take globs) runs the
``lean`` loop (``fxsparse.speed.lean_decode``: static cache, one compiled step, CUDA events per
step) or ``hf`` (``generate`` with a static cache and ``compile_config``; step time: the median
interval between the tokens a streamer receives). Sparse variants use
``prepare_weights``; sparsity suffixes: ``u`` no sibling grouping, ``f`` no
``emulate_precision_casts``, ``p`` Inductor's PDL, ``g`` the GEMV with PDL in any case, ``a`` no
activation prologue. Each row: ms/step, tokens/s, ratio to the dense twin, weight TB/s at the
achieved sparsity, the profiler's GPU time per kernel family, host gap, kernels per step,
graphs and recompiles. JSON and markdown are rewritten after every variant; ``--budget-s`` skips
variants that would not finish in time.

    PYTHONPATH=. python bench/decode.py --preset llama3-8b --loops lean --batch 1 4 \
        --sparsity dense 0.0 0.4 0.5 --skip '*:4:0.0' '*:4:0.4' --budget-s 520 --out $OUT/decode_lean
    PYTHONPATH=. python bench/decode.py --preset llama3-8b smollm2-135m --loops hf lean --batch 1 \
        --sparsity dense 0.0 0.5 --only 'llama3-8b:hf:*' 'smollm2-135m:lean:1:dense' \
        'smollm2-135m:lean:1:0.5' --budget-s 520 --out $OUT/decode_hf
    PYTHONPATH=. python bench/decode.py --report decode_lean.json decode_hf.json \
        --out bench/results/decode_h100

8-bit weights (``--weights fp8`` or ``int8``, torchao's weight-only configs on every projection,
``lm_head`` kept bf16): a sparsity with a ``q`` suffix runs on the quantized twin (the plan is
calibrated on the bf16 model, whose layer names the twin keeps): ``denseq`` is torchao's path
under Inductor, ``0.5q`` fxsparse on the 8-bit data. The model is quantized in place once, after
every bf16 variant, so ``q`` variants run last; each row's "vs dense" is against its own format's
dense twin, and ``q`` rows also show the ratio to bf16 dense. Llama-3-8B at batch 1:

    PYTHONPATH=. python bench/decode.py --preset llama3-8b --loops lean --batch 1 --weights fp8 \
        --sparsity dense denseq 0.0q 0.4q 0.5q --budget-s 520 --out $OUT/decode_fp8

Smoke test on CPU:

    PYTHONPATH=. python bench/decode.py --preset tiny --device cpu --new-tokens 16 --out /tmp/d

Tensor parallelism (``--tp N`` under ``torchrun --nproc-per-node N``): the model is sharded by
``parallelize_module`` on the meta device (q/k/v/gate/up column-parallel, o/down row-parallel),
each rank allocates and fills its shards only, calibration merges the ranks' statistics, and rank
0 logs, times and writes; rows are ``preset@tpN:...`` and the all-reduce kernels have a column.
``--tp 1`` against the same run without ``--tp`` (``--report`` of both: ``vs no TP``) is what the
distributed wrapping costs per step on one GPU (``docs/distributed.md``). ``llama3-70b`` has
Llama-3-70B's shapes (80 layers; ``--layers`` cuts it, as for ``llama3-8b``). On CPU:

    PYTHONPATH=. torchrun --nproc-per-node 2 bench/decode.py --tp 2 --preset tiny --device cpu \
        --new-tokens 8 --sparsity dense 0.5 --out /tmp/d_tp2
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import statistics
import sys
import time
import traceback
import unittest.mock
from pathlib import Path

import torch

import fxsparse
from fxsparse import IgnoredScope, TargetScope, sharding, speed
from fxsparse.kernels import sparse_gemv
from fxsparse.methods import collect_method_statistics, plan_from_observers
from fxsparse.plan import linear_layers
from fxsparse.scope import resolve_targets

PRESETS = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=True),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}
_T0 = time.perf_counter()


_RANK = 0  # this process's rank under ``--tp`` (torchrun); only rank 0 logs and writes


def log(msg: str) -> None:
    if _RANK == 0:
        print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def init_tp(tp: int, device: str):
    """``--tp N``: the process group torchrun set up (NCCL on CUDA, gloo on CPU), this rank's GPU,
    and a one-dimensional device mesh of N ranks."""
    global _RANK
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if "RANK" not in os.environ:
        sys.exit("error: --tp runs under torchrun (torchrun --nproc-per-node N bench/decode.py --tp N ...)")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if dist.get_world_size() != tp:
        sys.exit(f"error: --tp {tp} but torchrun started {dist.get_world_size()} processes")
    _RANK = dist.get_rank()
    return init_device_mesh(device, (tp,))


def tp_styles(model) -> dict:
    """``parallelize_module``'s plan for a Llama, as torchtitan and transformers' ``tp_plan`` shard
    it: q/k/v and gate/up column-parallel, o and down row-parallel (one all-reduce each)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {}
    for name, _ in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            styles[name] = ColwiseParallel()
        elif leaf in ("o_proj", "down_proj"):
            styles[name] = RowwiseParallel()
    return styles


@torch.no_grad()
def build_model(preset: str, layers: int | None, device: str, dtype: torch.dtype, seed: int = 0, mesh=None):
    """Random-weight Llama of a preset's shapes, initialised directly on ``device``. With a
    device ``mesh`` (``--tp``) it is sharded by ``parallelize_module`` while still on the meta
    device, so each rank allocates and fills only its shards (a 70B model never exists whole);
    every rank draws the same numbers, so replicated weights agree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(PRESETS[preset])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype)
    if mesh is not None:
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(model, mesh, tp_styles(model))
    model = model.to_empty(device=device).eval()
    if cfg.tie_word_embeddings:  # to_empty makes a new tensor per module: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        p = sharding.local_tensor(p)  # a DTensor's shard, filled in place
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, cfg.initializer_range, generator=g)
    rot = model.model.rotary_emb  # its buffers are computed at init, not parameters
    model.model.rotary_emb = type(rot)(config=cfg).to(device)
    model.generation_config.pad_token_id = 0
    return model


def set_layout(model, plan, grouped: bool = True) -> None:
    """Planned linears' weights column-major (``prepare_weights``) with a plan, row-major without
    (a torchao weight: its 8-bit data, as torchao made it)."""
    from fxsparse.quantized import is_torchao

    for m in model.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if is_torchao(m.weight):  # torchao's own layout for its path
            if not m.weight.qdata.is_contiguous():
                m.weight.qdata = m.weight.qdata.contiguous()
        elif not sharding.local_tensor(m.weight).is_contiguous():
            sharding.make_row_major(m.weight)
    if plan is not None:
        fxsparse.prepare_weights(model, plan, group_siblings=grouped)


def parse_sparsity(s: str) -> tuple[float | str, dict]:
    """``"dense"``, ``"0.5"``, or either with suffixes: ``u`` ungrouped siblings, ``f`` fused
    masks without ``emulate_precision_casts``, ``a`` no activation prologue
    (``fuse_activations=False``), ``s`` split-K epilogue instead of float32 outputs
    (``accumulate=False``), ``p`` Inductor's programmatic dependent launch
    (``triton.enable_pdl``, also for dense), ``g`` the GEMV launched with it whatever Inductor
    does (``sparse_gemv.ROW_PDL``): (value, options; ``inductor_pdl`` and ``gemv_pdl`` are not
    backend options)."""
    value = "dense" if s.startswith("dense") else s.rstrip("ufpgasq")
    flags = s[len(value):]
    opts = {"inductor_pdl": True} if "p" in flags else {}
    if "q" in flags:
        opts["quantized"] = True  # on the 8-bit twin (--weights); not a backend option
    if value == "dense":
        return value, opts
    opts["group_siblings"] = "u" not in flags
    if "g" in flags:
        opts["gemv_pdl"] = True
    if "f" in flags:
        opts["emulate_precision_casts"] = False
    if "a" in flags:
        opts["fuse_activations"] = False
    if "s" in flags:
        opts["accumulate"] = False
    return float(value), opts


def matches(preset: str, loop: str, batch: int, sparsity, patterns: list[str]) -> bool:
    """Whether ``preset:loop:batch:sparsity`` (or ``loop:batch:sparsity``) matches a glob."""
    return any(fnmatch.fnmatch(f"{preset}:{loop}:{batch}:{sparsity}", pat)
               or fnmatch.fnmatch(f"{loop}:{batch}:{sparsity}", pat) for pat in patterns)


def variant_key(r: dict) -> str:
    tp = f"@tp{r['tp']}" if r.get("tp") else ""
    return f"{r['preset']}{tp}:{r['loop']}:{r['batch']}:{r['sparsity']}"


def _fmt(v, spec=".3f") -> str:
    return "—" if v is None else format(v, spec)


def table(rows: list[dict], info: list[str]) -> str:
    # each variant against the dense twin compiled the same way (``p``: Inductor PDL on both)
    dense = {(r["preset"], r["layers"], r.get("tp"), r["loop"], r["batch"], r["sparsity"]): r["ms_per_step"]
             for r in rows if str(r.get("sparsity")).startswith("dense") and r.get("ms_per_step")}
    weights = {r.get("weights") for r in rows if r.get("weights")}
    title = "# decode: dense (Inductor) vs sparse_act" + (
        f" ({', '.join(sorted(weights))} weights)" if weights - {"bf16"} else "")
    # a tensor-parallel row against the same variant of the model without tensor parallelism
    plain = {(r["preset"], r["layers"], r["loop"], r["batch"], str(r["sparsity"])): r["ms_per_step"]
             for r in rows if not r.get("tp") and r.get("ms_per_step")}
    lines = [title, "", *[f"* {i}" for i in info], "",
             "ms/step: one decode step (batch B tokens); tok/s = B / step; weight TB/s: linear "
             "weight bytes the step needs at the achieved sparsity (batch > 1: union of rows) / step "
             "time; kernel columns: GPU ms per step by family (profiler; all-reduce: the collectives); "
             "gap = step - GPU busy (host-side); host: host ms per call. TP N: sharded over N GPUs by "
             "parallelize_module (rank 0's times; weight bytes are the whole model's); vs no TP: the same "
             "variant's ms/step without tensor parallelism / this row's.", "",
             "| model | loop | B | variant | achieved sparsity | ms/step | tok/s | vs dense | vs no TP "
             "| weight TB/s | sparse GEMV | gemm | attn | other | memcpy | all-reduce | GPU busy | gap "
             "| host | kernels/step | graphs / recompiles |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        model = f"{r['preset']} ({r['layers']} L" + (f", TP {r['tp']})" if r.get("tp") else ")")
        if r.get("error"):
            lines.append(f"| {model} | {r['loop']} | {r['batch']} | {r['sparsity']} | error: "
                         f"{r['error'][:80]} |" + " |" * 16)
            continue
        ms = r["ms_per_step"]
        flags = parse_sparsity(str(r["sparsity"]))[1]
        twin = ("densep" if "inductor_pdl" in flags else "dense") + ("q" if flags.get("quantized") else "")
        base = dense.get((r["preset"], r["layers"], r.get("tp"), r["loop"], r["batch"], twin))
        ratio = f"{base / ms:.2f}x" if base else "—"
        bf16 = dense.get((r["preset"], r["layers"], r.get("tp"), r["loop"], r["batch"], twin.rstrip("q")))
        if flags.get("quantized") and bf16:
            ratio += f" ({bf16 / ms:.2f}x bf16)"
        no_tp = plain.get((r["preset"], r["layers"], r["loop"], r["batch"], str(r["sparsity"])))
        vs_plain = f"{no_tp / ms:.3f}x" if r.get("tp") and no_tp else "—"
        is_dense = str(r["sparsity"]).startswith("dense")
        variant = r["sparsity"] if is_dense else f"sparse_act {r['sparsity']}"
        if r.get("weights") and r["weights"] != "bf16":
            variant += f" ({r['weights']})"
        ach = r.get("achieved_sparsity")
        b = r.get("breakdown") or {}
        lines.append(
            f"| {model} | {r['loop']} | {r['batch']} | {variant} | {_fmt(ach, '.3f')} | {ms:.3f} | "
            f"{r['tokens_per_s']:.1f} | {ratio} | {vs_plain} | {r['weight_TBps']:.3g} | "
            + " | ".join(_fmt(b.get(f"{k}_ms")) for k in speed.FAMILIES)
            + f" | {_fmt(b.get('busy_ms'))} | {_fmt(b.get('gap_ms'))} | {_fmt(r.get('host_ms_per_step'))} "
            f"| {_fmt(b.get('kernels_per_step'), '.0f')} | {r.get('graphs', '—')} / "
            f"{r.get('recompiles', '—')} |")
    details = [r for r in rows if r.get("profile")]
    if details:
        lines += ["", "Per step, from the profiler: the largest kernels (us) and host-side events (us; "
                  "CUDA runtime calls per step)", ""]
    for r in details:
        p = r["profile"]
        kern = "; ".join(f"`{k[:60]}` {v:.1f}" for k, v in p["top_kernels"][:4]) or "—"
        host = "; ".join(f"`{k[:50]}` {v:.1f}" for k, v in p["host_top"][:4]) or "—"
        calls = ", ".join(f"{k} {v:.1f}" for k, v in p.get("runtime", {}).items()) or "—"
        lines.append(f"* {variant_key(r)}: kernels {kern}. Host: {host}. Calls: {calls}."
                     + (f" ({p['note']})" if p.get("note") else ""))
    return "\n".join(lines)


def write(out: str | None, rows: list[dict], info: list[str]) -> str:
    text = table(rows, info)
    if out and _RANK == 0:
        prefix = Path(out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        prefix.with_suffix(".md").write_text(text + "\n")
    return text


def report(files: list[str], out: str | None) -> None:
    rows, info = {}, []
    for f in files:
        data = json.loads(Path(f).read_text())
        info += [i for i in data.get("info", []) if i not in info]
        for r in data["rows"]:
            if "loop" in r:  # rows of the old single-loop format lack the keys
                rows[variant_key(r)] = r
    print(write(out, list(rows.values()), info))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["llama3-8b"], choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None,
                    help="override the layer count of llama3-8b and llama3-70b")
    ap.add_argument("--tp", type=int, default=0,
                    help="tensor parallelism over N GPUs (parallelize_module; run under torchrun "
                         "--nproc-per-node N); 0: none")
    ap.add_argument("--loops", nargs="+", default=["lean", "hf"], choices=("lean", "hf"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--sparsity", nargs="+", default=["dense", "0.0", "0.4", "0.5"],
                    help="'dense' (Inductor) and/or target sparsities for sparse_act")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="variants to leave out, globs on 'preset:loop:batch:sparsity' (or "
                         "'loop:batch:sparsity' for every preset)")
    ap.add_argument("--only", nargs="*", default=[],
                    help="if given, run only the variants matching one of these globs (same form)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no variant after this many seconds if the last one would not fit "
                         "(so a device-call limit never cuts a run mid-variant)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=6, help="lean: warm-up steps (compile, graphs)")
    ap.add_argument("--repeats", type=int, default=2, help="hf: timed generate calls (median)")
    ap.add_argument("--profile-steps", type=int, default=8, help="0: no profiler pass")
    ap.add_argument("--top-kernels", type=int, default=8,
                    help="lean: kernels (us and launches per step) kept in the JSON and logged")
    ap.add_argument("--sparsity-steps", type=int, default=8,
                    help="decode steps over which achieved sparsity is measured (eager hooks)")
    ap.add_argument("--calib-prompts", type=int, default=4)
    ap.add_argument("--weights", choices=("fp8", "int8"), default="fp8",
                    help="the 8-bit format of 'q' variants (torchao weight-only, lm_head kept bf16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mode", default=None,
                    help="Inductor mode (default: reduce-overhead on CUDA, none on CPU)")
    ap.add_argument("--out", default=None, help="prefix of the .json and .md to write")
    ap.add_argument("--report", nargs="+", default=None,
                    help="only merge these JSON results into one table (--out) and exit")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        report(args.report, args.out)
        return
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")
    mesh = init_tp(args.tp, dev) if args.tp else None
    mode = args.mode if args.mode is not None else ("reduce-overhead" if dev == "cuda" else None)
    if mode in ("none", "default"):
        mode = None
    if mode == "reduce-overhead" and dev != "cuda":
        sys.exit("error: mode reduce-overhead (CUDA graphs) needs --device cuda")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    sparsities = [s if s == "dense" or not s[-1].isdigit() else float(s) for s in args.sparsity]
    import transformers
    import triton

    info = [f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}, "
            f"triton {triton.__version__}, transformers {transformers.__version__}, {dtype}, mode {mode}",
            f"{args.prompt_len} prompt tokens, {args.new_tokens} new tokens, random weights, thresholds "
            f"from {args.calib_prompts} random-token prompts on all seven projections (lm_head dense)"]
    for line in info:
        log(line)
    rows: list[dict] = []
    for preset in args.preset:
        variants = [(loop, b, s) for loop in args.loops for b in args.batch for s in sparsities
                    if not matches(preset, loop, b, s, args.skip)
                    and (not args.only or matches(preset, loop, b, s, args.only))]
        if not variants:
            continue
        run_preset(args, preset, variants, dev, dtype, mode, rows, info, mesh)
    text = write(args.out, rows, info)
    if _RANK == 0:
        print(text)
    if mesh is not None:
        torch.distributed.destroy_process_group()


def run_preset(args, preset, variants, dev, dtype, mode, rows, info, mesh=None) -> None:
    layers = args.layers if preset in ("llama3-8b", "llama3-70b") else None
    t = time.perf_counter()
    model = build_model(preset, layers, dev, dtype, mesh=mesh)
    cfg = model.config
    log(f"{preset}: {cfg.num_hidden_layers} layers, h={cfg.hidden_size}, i={cfg.intermediate_size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, built in "
        f"{time.perf_counter() - t:.1f} s; variants: {', '.join(f'{a}:{b}:{c}' for a, b, c in variants)}")
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(dev)
             for _ in range(args.calib_prompts)]
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=g).to(dev)
               for b in sorted({v[1] for v in variants})}
    plans: dict[float, fxsparse.SparsityPlan] = {}
    if any(parse_sparsity(str(s))[0] != "dense" for _, _, s in variants):
        t = time.perf_counter()
        targets, skipped = resolve_targets(linear_layers(model), {TargetScope(patterns=[r".*_proj"]): 0.5},
                                           IgnoredScope(names=["lm_head"]))
        torch.compiler.reset()
        stats = collect_method_statistics(model, calib, targets, skipped=skipped, batch_quantiles=False,
                                          progress=False)
        for s in sorted({v for _, _, s in variants if (v := parse_sparsity(str(s))[0]) != "dense"}):
            # under --tp the ranks merged their statistics: rank 0's plan is every rank's
            plans[s] = sharding.same_on_every_rank(plan_from_observers(stats, dict.fromkeys(targets, s),
                                                                       "quantile"))
        del stats
        log(f"calibrated {len(targets)} layers in {time.perf_counter() - t:.1f} s")
    achieved: dict[tuple, dict] = {}
    max_len = args.prompt_len + args.new_tokens + 8
    last_s = 0.0
    quantized = False
    # the bf16 variants first: the model is quantized in place before the first 'q' one
    variants = sorted(variants, key=lambda v: bool(parse_sparsity(str(v[2]))[1].get("quantized")))
    for loop, b, s in variants:
        if args.budget_s is not None and time.perf_counter() - _T0 + last_s > args.budget_s:
            log(f"--- {preset}:{loop}:{b}:{s} skipped: the budget of {args.budget_s:.0f} s would run out")
            continue
        t_variant = time.perf_counter()
        row = {"preset": preset, "layers": cfg.num_hidden_layers, "loop": loop, "batch": b,
               "sparsity": s, "mode": mode, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
               "tp": args.tp or None}
        value, opts = parse_sparsity(str(s))
        plan = plans.get(value)
        q = opts.pop("quantized", False)
        row["weights"] = args.weights if q else "bf16"
        log(f"--- {variant_key(row)}")
        try:
            if q and not quantized:
                t = time.perf_counter()
                quantize_weights(model, args.weights)
                quantized = True
                log(f"quantized to {args.weights} (torchao weight-only) in {time.perf_counter() - t:.1f} s")
            if plan is not None and (value, b, q) not in achieved and mesh is None:  # eager hooks: unsharded
                t = time.perf_counter()
                achieved[(value, b, q)] = speed.decode_sparsity(model, plan, prompts[b], args.sparsity_steps)
                log(f"achieved sparsity measured in {time.perf_counter() - t:.1f} s")
            per_layer = achieved.get((value, b, q), {})
            torch.compiler.reset()
            torch._dynamo.utils.counters.clear()
            set_layout(model, plan, opts.get("group_siblings", True))
            pdl = opts.pop("inductor_pdl", False)
            gemv_pdl = opts.pop("gemv_pdl", sparse_gemv.ROW_PDL)
            with (torch._inductor.config.patch({"triton.enable_pdl": pdl}),
                  unittest.mock.patch.object(sparse_gemv, "ROW_PDL", gemv_pdl)):
                if loop == "lean":
                    run_lean(args, model, plan, prompts[b], mode, max_len, row, opts)
                else:
                    run_hf(args, model, plan, prompts[b], mode, dev, row, opts)
            union = {n: d["union"] for n, d in per_layer.items()}
            wb = speed.linear_weight_bytes(model)
            planned = sum(wb[n] for n in union)
            row["achieved_sparsity"] = (sum(wb[n] * u for n, u in union.items()) / planned
                                        if planned else None)
            row["achieved_row_sparsity"] = (sum(wb[n] * d["sparsity"] for n, d in per_layer.items())
                                            / planned if planned else None)
            row["weight_bytes"] = speed.weight_bytes_per_step(model, union)
            row["dense_weight_bytes"] = speed.weight_bytes_per_step(model)
            ms = row["ms_per_step"]
            row["tokens_per_s"] = b * 1e3 / ms
            row["weight_TBps"] = row["weight_bytes"] / ms / 1e9
            if row.get("profile"):
                row["breakdown"] = speed.breakdown_row(ms, row["profile"])
            br = row.get("breakdown", {})
            log(f"{variant_key(row)}: {ms:.3f} ms/step, {row['tokens_per_s']:.1f} tok/s, "
                f"{row['weight_TBps']:.3g} TB/s, achieved sparsity {_fmt(row['achieved_sparsity'])}, "
                f"GPU busy {_fmt(br.get('busy_ms'))} ms, gap {_fmt(br.get('gap_ms'))} ms, "
                f"graphs {row.get('graphs')}, recompiles {row.get('recompiles')}, "
                f"cudagraph skips {row.get('cudagraph_skips')}, sparse sites {row.get('sparse_lowered')} "
                f"({row.get('sparse_grouped')} in sibling groups)")
            if row.get("profile"):
                p = row["profile"]
                counts = p.get("kernel_counts", {})
                top = p["top_kernels"][:max(5, args.top_kernels)]
                log("  top kernels/step (us, launches): "
                    + "; ".join(f"{k} {v:.1f} x{counts.get(k, 0):g}" for k, v in top))
                log("  host/step (us): " + "; ".join(f"{k} {v:.1f}" for k, v in p["host_top"][:5]))
                if p.get("runtime"):
                    log("  runtime calls/step: " + ", ".join(f"{k} {v:.1f}" for k, v in p["runtime"].items()))
        except Exception as e:  # keep going: the other variants are still worth their device time
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
            log(f"{variant_key(row)} failed: {row['error'][:200]}")
        last_s = row["variant_s"] = time.perf_counter() - t_variant
        rows.append(row)
        write(args.out, rows, info)
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def quantize_weights(model, weights: str) -> None:
    """torchao's weight-only quantization of every projection in place (``lm_head`` kept bf16,
    as the plans leave it dense)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = {"fp8": Float8WeightOnlyConfig, "int8": Int8WeightOnlyConfig}[weights]()
    set_layout(model, None)  # row-major, as torchao expects its inputs
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")


def run_lean(args, model, plan, prompt, mode, max_len, row, opts) -> None:
    counters = torch._dynamo.utils.counters
    step = speed.compile_step(model, plan, mode=mode, **(opts if plan is not None else {}))
    cache = speed.make_cache(model, max_len)
    t = time.perf_counter()
    speed.lean_decode(model, step, prompt, args.warmup, cache=cache)  # compile + CUDA graphs
    row["compile_s"] = time.perf_counter() - t
    row["graphs"] = int(counters["stats"]["unique_graphs"])
    log(f"compiled + warmed up in {row['compile_s']:.1f} s ({row['graphs']} graph(s))")
    timing = speed.lean_decode(model, step, prompt, args.new_tokens, cache=cache)
    row.update(timing.summary())
    row["step_ms_quartiles"] = statistics.quantiles(timing.step_ms, n=4) if len(timing.step_ms) > 1 else []
    if args.profile_steps:
        try:  # the timings above must survive a profiler failure
            row["profile"] = speed.profile_lean(model, step, prompt, args.profile_steps, cache=cache,
                                                top=args.top_kernels)
        except Exception as e:
            traceback.print_exc()
            row["profile_error"] = f"{type(e).__name__}: {e}"
    row["recompiles"] = int(counters["stats"]["unique_graphs"]) - row["graphs"]
    row["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
    row["sparse_lowered"] = int(counters["fxsparse"]["lowered"])
    row["sparse_grouped"] = int(counters["fxsparse"]["grouped"])
    row["first_tokens"] = timing.tokens[0, :8].tolist()


def run_hf(args, model, plan, prompt, mode, dev, row, opts) -> None:
    from transformers import CompileConfig

    if plan is not None:
        cfg = fxsparse.compile_config(plan, mode=mode, compile_on_cpu=dev != "cuda", **opts)
    else:
        cfg = CompileConfig(fullgraph=False, dynamic=None, backend="inductor", mode=mode)
        if dev != "cuda":
            cfg._compile_all_devices = True
    res = speed.hf_decode(model, prompt, args.new_tokens, cfg, repeats=args.repeats,
                          profile_steps=args.profile_steps)
    toks = res.pop("tokens")
    row.update(res)
    row["compile_s"] = res["warmup_s"]
    row["first_tokens"] = toks[0, :8].tolist()
    log(f"generate: compiled + warmed up in {res['warmup_s']:.1f} s, prefill {res['prefill_ms']:.1f} ms, "
        f"generate {res['generate_ms']:.1f} ms, step median {_fmt(res['ms_per_step'])} ms "
        f"(max {_fmt(res['max_step_ms'])}; by difference {_fmt(res['diff_ms_per_step'])})"
        + (f"; profiler failed: {res['profile_error']}" if "profile_error" in res else ""))


if __name__ == "__main__":
    main()
