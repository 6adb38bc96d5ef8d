"""Probe: is enwiki's o_proj shift an artefact of Lee windows that splice articles?

Lee has one ~250-token article per line, so almost every 256-token calibration window ends in
a second, unrelated article, while enwiki windows lie inside one long article. Dense model
(no plan, no compounding): per-layer quantile thresholds from 128 spliced Lee windows (the
bench default), from article-aligned windows (the first 256 tokens of each article that has
as many: 102 of 300) and from windows that start at an article and run on into the next
ones; then the fraction below each threshold on 128 enwiki windows spread over the dump.
Histograms of log2|x| (8192 bins over 2^-24 .. 2^8) per distinct input (q/k/v share one, so
do gate/up). ~5 min on 2 cores.

    PYTHONPATH=. python bench/probe/calib_splice.py
"""

from __future__ import annotations

import time

import torch

from fxsparse.data import enwiki_text, lee_text, load_model, token_chunks

SEQ = 256
LO, HI, BINS = -24.0, 8.0, 8192


@torch.no_grad()
def histograms(model, names: list[str], windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    hist = {n: torch.zeros(BINS, dtype=torch.float64) for n in names}
    mods = dict(model.named_modules())

    def hook(name):
        def fn(_m, args):
            v = args[0].float().abs().clamp_min(1e-30).log2().flatten().clamp(LO, HI - 1e-6)
            hist[name] += torch.histc(v, BINS, LO, HI).double()
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for w in windows:
            model(w, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hist


def threshold_bin(h: torch.Tensor, s: float) -> int:
    """First bin at or above the s-quantile: entries in bins below it are dropped."""
    return int(torch.searchsorted(h.cumsum(0) / h.sum(), torch.tensor(s, dtype=torch.float64)))


def main() -> None:
    model, tok = load_model()
    model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and n.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))]
    lee = lee_text()
    ids = [tok(a, return_tensors="pt").input_ids[0] for a in lee.split("\n") if a.strip()]
    starts = range(0, len(ids), max(1, len(ids) // 128))
    sets = {
        "spliced": token_chunks(tok, lee, SEQ, 128, spread=True),
        "aligned": [a[:SEQ].unsqueeze(0) for a in ids if a.numel() >= SEQ][:128],
        "from-start": [w.unsqueeze(0) for w in (torch.cat(ids[i:i + 4])[:SEQ] for i in starts)
                       if w.numel() == SEQ][:128],
        "enwiki": token_chunks(tok, enwiki_text(), SEQ, 128, spread=True),
    }
    t0 = time.time()
    hist = {}
    for name, windows in sets.items():
        hist[name] = histograms(model, names, windows)
        print(f"{name}: {len(windows)} windows, {time.time() - t0:.0f} s", flush=True)
    print(f"\nachieved - target on enwiki, points (dense model, {len(names)} inputs)")
    for s in (0.3, 0.4, 0.5):
        for cal in ("spliced", "aligned", "from-start"):
            dev = {n: 100 * (float(hist["enwiki"][n][:threshold_bin(hist[cal][n], s)].sum()
                                   / hist["enwiki"][n].sum()) - s) for n in names}
            worst = sorted(dev.items(), key=lambda kv: -abs(kv[1]))[:3]
            o = [v for n, v in dev.items() if n.endswith("o_proj")]
            print(f"target {s:.1f} {cal:10s} worst " + ", ".join(
                f"{n.removeprefix('model.layers.')} {v:+.2f}" for n, v in worst)
                + f"; layer 20 o_proj {dev['model.layers.20.self_attn.o_proj']:+.2f}; mean |dev| "
                f"{sum(map(abs, dev.values())) / len(dev):.2f}; o_proj mean {sum(o) / len(o):+.2f}")


if __name__ == "__main__":
    main()
