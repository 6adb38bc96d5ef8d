"""Plots of a methods sweep (matplotlib, PNG): per-layer activation ratio and perplexity curves.

* ``plot_activation_ratio``: 1 - measured sparsity per layer, one line per method, in the style
  of Sparsing Law's per-layer activation-ratio figures (seed 003), so layers that a method
  leaves denser than others stand out.
* ``plot_ppl_vs_sparsity``: perplexity against achieved mean sparsity, one line per method, as
  seed 002 plots accuracy against sparsity ratio.

Both take plain dicts (what ``bench/methods.py`` stores in JSON), so plots can be redrawn from a
saved run without a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_activation_ratio", "plot_ppl_vs_sparsity"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _style(i: int) -> dict:
    """Distinct colour and marker per line (more lines than one colour cycle holds)."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](i % 20), "marker": "os^vDP*Xh<>"[i % 11]}


def _order(name: str) -> tuple[int, int, str]:
    m = re.search(r"layers\.(\d+)\.", name)
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    kind = next((i for i, k in enumerate(kinds) if name.endswith(k)), len(kinds))
    return (int(m.group(1)) if m else -1, kind, name)


def plot_activation_ratio(
    per_layer: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    title: str = "activation ratio per layer",
    kinds: Sequence[str] = ("mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.o_proj"),
) -> Path:
    """``per_layer``: ``{method: {layer name: measured sparsity}}``. One panel per layer kind,
    block index on x, activation ratio (1 - sparsity) on y."""
    plt = _pyplot()
    kinds = [k for k in kinds if any(n.endswith(k) for d in per_layer.values() for n in d)]
    fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(4.2 * max(len(kinds), 1), 3.6),
                             squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds, strict=False):
        for i, (method, layers) in enumerate(per_layer.items()):
            names = sorted((n for n in layers if n.endswith(kind)), key=_order)
            xs = [_order(n)[0] for n in names]
            ax.plot(xs, [1 - layers[n] for n in names], lw=1, ms=3, label=method, **_style(i))
        ax.set_title(kind)
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("activation ratio (1 - sparsity)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ppl_vs_sparsity(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    dense_ppl: float | None = None,
    title: str = "perplexity vs sparsity",
) -> Path:
    """``curves``: ``{method: [(achieved sparsity, perplexity), ...]}``; dense as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for i, (method, pts) in enumerate(curves.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, ms=4, label=method, **_style(i))
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="k", ls="--", lw=1, label=f"dense ({dense_ppl:.2f})")
        ax.axhline(dense_ppl * 1.05, color="gray", ls=":", lw=1, label="dense +5%")
    ax.set_xlabel("achieved sparsity (held-out text, weighted by layer size)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
