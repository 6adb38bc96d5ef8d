"""Decode speed, dense (Inductor) vs sparse_act, in a lean gpt-fast-style loop.

A Llama model with random weights built from a config (no hub access on the GPU machine; the
default is Llama-3-8B's layer shapes with fewer layers, so that two compilations fit in one
device call), thresholds calibrated on random-token prompts for the given sparsity on all seven
projections, then for each variant: static KV cache, one compiled decode step (CUDA graphs via
``mode="reduce-overhead"``), greedy argmax on device, nothing else per step. Timings exclude
compilation, synchronise before reading clocks, report ms/token, tokens/s, and the weight
bytes streamed per token over the step time (achieved bandwidth).

    PYTHONPATH=. python bench/decode.py --layers 8 --sparsity 0.5 0.0   # on the GPU machine
    PYTHONPATH=. python bench/decode.py --tiny --device cpu              # smoke test here
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import fxsparse
from fxsparse import IgnoredScope, TargetScope

model: LlamaForCausalLM | None = None  # a global, so compiled graphs name layers model.layers.N
cache: StaticCache | None = None


def step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def build(args) -> LlamaConfig:
    if args.tiny:
        return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0)


def decode(fn, prompt, new_tokens, device, max_len, cfg, dtype, use_graphs=False):
    """Prefill eagerly, then time ``new_tokens`` steps of ``fn``; returns (ms/token list, tokens)."""
    global cache
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    with torch.no_grad():
        pos = torch.arange(prompt.shape[1], device=device)
        out = model(input_ids=prompt, past_key_values=cache, cache_position=pos, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok]
        times = []
        for i in range(new_tokens):
            p = torch.tensor([prompt.shape[1] + i], device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            if device == "cuda" and use_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # one graph replay per token
            tok = fn(tok, p).clone()  # CUDA graphs reuse their output buffer
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
            toks.append(tok.clone())
    return times, torch.cat(toks, 1)


def main() -> None:
    global model
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.0])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", default="reduce-overhead",
                    help="Inductor mode on CUDA ('none': no CUDA graphs)")
    args = ap.parse_args()
    dev, dtype = args.device, (torch.bfloat16 if args.device == "cuda" else torch.float32)
    torch.manual_seed(0)
    cfg = build(args)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if "embed_tokens" not in n)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).to(dev)
    calib = [torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(dev)
             for _ in range(4)]
    max_len = args.prompt_len + args.new_tokens + 8
    info = (f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, mode {args.mode}, "
            f"torch {torch.__version__}, "
            f"triton {__import__('triton').__version__}, {cfg.num_hidden_layers} layers of "
            f"h={cfg.hidden_size} i={cfg.intermediate_size}, batch {args.batch}, "
            f"{args.new_tokens} new tokens after {args.prompt_len}")
    print(info, flush=True)

    mode = args.mode if dev == "cuda" and args.mode != "none" else None
    rows = []
    variants = [("dense (Inductor)", None)] + [(f"sparse_act s={s}", s) for s in args.sparsity]
    for label, s in variants:
        torch.compiler.reset()
        if s is None:
            fn = torch.compile(step, mode=mode)
        else:
            targets = {TargetScope(patterns=[r".*_proj"]): s}
            plan = fxsparse.calibrate(model, calib, targets, IgnoredScope(names=["lm_head"]),
                                      progress=False)
            fxsparse.prepare_weights(model, plan)  # column-major in place, once
            opts = {"plan": plan} | ({"mode": mode} if mode else {})
            fn = torch.compile(step, backend="sparse_act", options=opts)
        t0 = time.perf_counter()
        decode(fn, prompt, 4, dev, max_len, cfg, dtype, bool(mode))  # compile + warm up
        compile_s = time.perf_counter() - t0
        times, toks = decode(fn, prompt, args.new_tokens, dev, max_len, cfg, dtype, bool(mode))
        ms = statistics.median(times[8:])
        rows.append({"variant": label, "sparsity": s, "ms_per_token": ms,
                     "tokens_per_s": args.batch * 1e3 / ms, "weight_TBps": weight_bytes / ms / 1e9,
                     "compile_s": compile_s})
        print(f"{label:22s} {ms:7.3f} ms/token  {args.batch * 1e3 / ms:8.1f} tok/s  "
              f"{weight_bytes / ms / 1e9:5.2f} TB/s of weights  (compile+warm-up {compile_s:.0f} s)",
              flush=True)
    base = rows[0]["ms_per_token"]
    lines = [f"# decode, {info}", "", "| variant | ms/token | tok/s | weight TB/s | vs dense |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms_per_token']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{r['weight_TBps']:.2f} | {base / r['ms_per_token']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "decode.json"), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
        with open(os.path.join(out, "decode.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
