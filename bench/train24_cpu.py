"""Train a tiny squared-ReLU Llama on CPU: dense vs 2:4 activations (seed 004).

Bytes of gensim's Lee corpus are the tokens (vocab 256: no tokenizer download). Every run
starts from the same weights and sees the same batches; the 2:4 runs are dense for the first
``--warmup`` steps, then prune ReLU^2 activations to 2:4 in the forward and use the
feature-wise 2:4 backward. Reports train loss, held-out loss and the natural sparsity of the
ReLU^2 activations; writes bench/results/train24_cpu.{json,png}.

    python bench/train24_cpu.py                 # 400 steps: dense, mvue, naive, soft
    python bench/train24_cpu.py --steps 40 --methods mvue
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fxsparse.training import activation_sparsity, convert_to_squared_relu_24

RESULTS = Path(__file__).resolve().parent / "results"


def lee_corpus() -> bytes:
    """gensim's ``lee_background.cor`` (about 24 KB of news text), as bytes."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gensim is not installed (pip install gensim)")
    root = Path(list(spec.submodule_search_locations)[0])
    return (root / "test" / "test_data" / "lee_background.cor").read_bytes()


def make_model(hidden: int, layers: int, intermediate: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def batches(data: torch.Tensor, batch: int, seq: int, steps: int, seed: int):
    """``steps`` batches of random windows of ``data`` (the same for every run)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (steps, batch), generator=gen)
    for s in starts:
        yield torch.stack([data[i : i + seq] for i in s.tolist()])


def train(
    method: str | None,
    steps: int = 300,
    warmup: int = 50,
    hidden: int = 128,
    layers: int = 4,
    intermediate: int = 256,
    seq: int = 64,
    batch: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    eval_every: int = 25,
    progress: bool = True,
) -> dict:
    """One run; ``method=None`` is the dense squared-ReLU baseline (same architecture)."""
    text = torch.tensor(list(lee_corpus()), dtype=torch.long)
    split = int(0.9 * len(text))
    train_data, held = text[:split], text[split:]
    torch.manual_seed(seed)
    model = make_model(hidden, layers, intermediate, seq)
    # dense baseline: the same converted model with a warm-up that never ends
    convert_to_squared_relu_24(
        model, method=method or "naive", dense_warmup_steps=warmup if method else 10**9
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    held_batch = torch.stack([held[i : i + seq] for i in range(0, len(held) - seq - 1, seq)][:16])
    probe = next(batches(train_data, 8, seq, 1, seed + 1))
    losses, evals, sparsity = [], [], []
    t0 = time.perf_counter()
    it = batches(train_data, batch, seq, steps, seed)
    bar = tqdm(it, total=steps, desc=method or "dense", disable=not progress, mininterval=2)
    for step, ids in enumerate(bar):
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps - 1:
            stats = activation_sparsity(model, probe)
            sparsity.append((step, sum(stats.values()) / len(stats)))
            with torch.no_grad():
                model.eval()
                evals.append((step, model(held_batch, labels=held_batch).loss.item()))
                model.train()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", sparsity=f"{sparsity[-1][1]:.3f}")
    return {
        "method": method or "dense",
        "train_loss": losses,
        "eval_loss": evals,
        "sparsity": sparsity,
        "seconds": time.perf_counter() - t0,
    }


def tail_mean(xs: list[float], n: int = 50) -> float:
    return sum(xs[-n:]) / len(xs[-n:])


def compare(runs: dict[str, dict], warmup: int, margin: float) -> dict:
    """Post-warm-up gap of each 2:4 run to dense: mean train loss over the last 50 steps."""
    dense = runs["dense"]
    out = {}
    for name, r in runs.items():
        if name == "dense":
            continue
        gap = tail_mean(r["train_loss"]) - tail_mean(dense["train_loss"])
        post = [b - a for a, b in zip(dense["train_loss"][warmup:], r["train_loss"][warmup:], strict=True)]
        out[name] = {
            "final_train_gap": gap,
            "final_eval_gap": r["eval_loss"][-1][1] - dense["eval_loss"][-1][1],
            "max_post_warmup_gap_ma20": max(
                sum(post[i : i + 20]) / 20 for i in range(0, max(1, len(post) - 19))
            ),
            "within_margin": gap <= margin,
        }
    return out


def _ma(xs: list[float], k: int) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def plot(runs: dict[str, dict], warmup: int, path: Path) -> None:
    """Loss curves, the 2:4 - dense loss gap, and the natural ReLU^2 sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.5))
    dense = runs["dense"]["train_loss"]
    for n, (name, r) in enumerate(runs.items()):
        col = f"C{n}"
        ax1.plot(_ma(r["train_loss"], 10), color=col, label=f"{name} (train, MA10)")
        ev = r["eval_loss"]
        ax1.plot([s for s, _ in ev], [v for _, v in ev], "o--", color=col, ms=3, label=f"{name} (held-out)")
        if name != "dense":
            gap = [b - a for a, b in zip(dense, r["train_loss"], strict=True)]
            ax2.plot(_ma(gap, 20), color=col, label=f"{name} - dense (MA20)")
        sp = r["sparsity"]
        ax3.plot([s for s, _ in sp], [v for _, v in sp], color=col, label=name)
    ax1.set_ylim(top=min(4.0, max(dense)))
    ax2.axhline(0, color="k", lw=0.5)
    for ax in (ax1, ax2, ax3):
        ax.axvline(warmup, color="grey", ls=":", label="end of dense warm-up")
        ax.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats/byte)")
    ax1.set_title("Tiny squared-ReLU Llama, bytes of the Lee corpus")
    ax2.set_ylabel("train-loss gap (nats)")
    ax2.set_title("2:4 minus dense (same init, same batches)")
    ax3.set_ylabel("fraction of ReLU^2 activations that are 0")
    ax3.set_title("Natural activation sparsity (before 2:4)")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--methods", default="mvue,naive,soft_threshold")
    ap.add_argument("--margin", type=float, default=0.05, help="allowed train-loss gap (nats)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "train24_cpu"))
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        plot(saved["runs"], saved["meta"]["warmup"], Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads")
    runs = {"dense": train(None, args.steps, args.warmup)}
    for m in args.methods.split(","):
        runs[m] = train(m, args.steps, args.warmup)
    cmp = compare(runs, args.warmup, args.margin)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "steps": args.steps,
        "warmup": args.warmup,
        "margin_nats": args.margin,
        "torch": torch.__version__,
        "threads": args.threads,
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "compare": cmp, "runs": runs}))
    plot(runs, args.warmup, out.with_suffix(".png"))
    print("\n| run | train loss (last 50) | held-out loss | sparsity (end) | gap to dense | s |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        gap = cmp.get(name, {}).get("final_train_gap", 0.0)
        print(
            f"| {name} | {tail_mean(r['train_loss']):.4f} | {r['eval_loss'][-1][1]:.4f} | "
            f"{r['sparsity'][-1][1]:.3f} | {gap:+.4f} | {r['seconds']:.0f} |"
        )
    ok = all(c["within_margin"] for c in cmp.values())
    print(f"\n2:4 runs within {args.margin} nats of dense after warm-up: {ok}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
