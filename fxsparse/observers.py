"""Activation observers: streaming statistics of a linear layer's input, in bounded memory.

An observer is an ``nn.Module`` whose ``forward(x)`` returns ``x`` unchanged and records:

* a signed histogram of ``x`` on a log-magnitude grid (256 bins per octave, 2^-64 .. 2^64), from
  which the threshold for *any* target sparsity and center (``Quantile(|X - c|, s)``) and the
  centers themselves (median, density peak) follow after one pass;
* optionally a histogram of ``|x - c| * scale`` for a fixed per-channel scale (column norms,
  attribution scores: hence the wide grid);
* per-channel count / sum / sum of squares / max |x| (float64);
* optionally an exact *probe*: given a plan entry, the dropped count and per-token dropped fraction.

Nothing stores activations, so memory is fixed: 512 KiB per signed histogram, none for a probe
without statistics. Values outside the grid still count (in the zero or top bin), and a threshold
that falls among them warns.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .kernels.threshold_linear import drop_score

__all__ = ["ActivationObserver", "LOG2_MIN", "LOG2_MAX", "BINS_PER_OCTAVE"]

LOG2_MIN = -64  # |x| below 2^-64 (~5e-20) lands in the zero bin (counted as underflow)
LOG2_MAX = 64  # |x| at or above 2^64 lands in the top bin (counted as overflow)
BINS_PER_OCTAVE = 256
_M = (LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE  # magnitude bins per sign
# Bins come straight from the float32 bit pattern: exponent and top 8 mantissa bits, i.e.
# 256 equal steps per octave. The 17-bit key (sign, exponent, 8 mantissa bits) indexes a lookup
# table that gives the histogram bin: one shift, one mask, one gather, one bincount per call.
_KEY_SHIFT = 23 - 8
_KEY_MIN = (127 + LOG2_MIN) << 8  # magnitude key of 2^LOG2_MIN
_KEY_MAX = (127 + LOG2_MAX) << 8  # magnitude key of 2^LOG2_MAX
_KEY_NONFINITE = 255 << 8  # exponent 255: inf and NaN
# bincount slots past the histogram (magnitude: _M + 1 + ...; signed: 2 * _M + 1 + ...)
_MAG_NONFINITE, _MAG_UNDER, _MAG_OVER = _M + 1, _M + 2, _M + 3
_S_NONFINITE, _S_UNDER, _S_NEG_OVER, _S_POS_OVER = 2 * _M + 1, 2 * _M + 2, 2 * _M + 3, 2 * _M + 4


def _bin_tables() -> tuple[Tensor, Tensor]:
    """(signed table over 17-bit keys, magnitude table over 16-bit keys).

    Magnitude: 0 = zero bin, 1.._M = bins, then the inf/NaN, underflow (0 < |x| < 2^LOG2_MIN;
    key 0, i.e. |x| < 2^-134, is zero) and overflow slots. Signed: _M is the zero bin,
    negatives below it, positives above it, then inf/NaN, underflow, -overflow, +overflow.
    Under- and overflow are folded into the zero and top bins after counting (``_fold``).
    """
    key = torch.arange(1 << 16, dtype=torch.int64)
    mag = (key - (_KEY_MIN - 1)).clamp(0, _M)
    mag[(key > 0) & (key < _KEY_MIN)] = _MAG_UNDER
    mag[key >= _KEY_MAX] = _MAG_OVER
    mag[key >= _KEY_NONFINITE] = _MAG_NONFINITE
    pos, neg = _M + mag, _M - mag  # sign bit 0 first, then 1
    for m, p, n in ((_MAG_NONFINITE, _S_NONFINITE, _S_NONFINITE), (_MAG_UNDER, _S_UNDER, _S_UNDER),
                    (_MAG_OVER, _S_POS_OVER, _S_NEG_OVER)):
        pos[mag == m], neg[mag == m] = p, n
    return torch.cat([pos, neg]), mag


_SIGNED_TABLE, _MAG_TABLE = _bin_tables()
# where the (underflow, -overflow, +overflow) and (underflow, overflow) counts are folded in
_SIGNED_FOLD = torch.tensor([_M, 0, 2 * _M])
_MAG_FOLD = torch.tensor([0, _M])


def _magnitude_edges(top: float) -> np.ndarray:
    """Upper edges of the _M magnitude bins (the last one stretched to ``top``)."""
    keys = (np.arange(_KEY_MIN + 1, _KEY_MIN + _M + 1, dtype=np.int64) << _KEY_SHIFT)
    e = keys.astype(np.int32).view(np.float32).astype(np.float64)
    e[-1] = max(e[-1], top)
    return e


_tables_on: dict[tuple[int, torch.device], Tensor] = {}


def _table(table: Tensor, device: torch.device) -> Tensor:
    key = (id(table), device)
    if key not in _tables_on:
        _tables_on[key] = table.to(device)
    return _tables_on[key]


# the calibration batch's attention mask ([batch, seq] bool) while the model runs on it
_TOKENS: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("fxsparse_tokens", default=None)


@contextlib.contextmanager
def observed_tokens(attention_mask: Tensor | None):
    """Observers record only the positions where ``attention_mask`` is nonzero (padding is not
    calibration data) for inputs shaped ``[batch, seq, ...]`` like the mask."""
    token = _TOKENS.set(None if attention_mask is None else attention_mask.bool())
    try:
        yield
    finally:
        _TOKENS.reset(token)


class ActivationObserver(nn.Module):
    """Records the distribution of one layer's input; see the module docstring."""

    def __init__(
        self,
        name: str,
        in_features: int,
        channel_scale: Tensor | None = None,
        scale_center: float = 0.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.in_features = in_features
        self.scale_center = float(scale_center)
        self.register_buffer("signed_hist", torch.zeros(2 * _M + 1, dtype=torch.int64))
        # values outside 2^LOG2_MIN..2^LOG2_MAX: (underflow, -overflow, +overflow)
        self.register_buffer("signed_outside", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("abs_max", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ch_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("ch_sum", torch.zeros(in_features, dtype=torch.float64))
        self.register_buffer("ch_sumsq", torch.zeros(in_features, dtype=torch.float64))
        self.register_buffer("ch_absmax", torch.zeros(in_features, dtype=torch.float64))
        if channel_scale is not None:
            if channel_scale.shape != (in_features,):
                raise ValueError(
                    f"observer {name}: channel_scale must have shape ({in_features},), "
                    f"got {tuple(channel_scale.shape)}"
                )
            self.register_buffer("channel_scale", channel_scale.detach().float().clone())
            self.register_buffer("scaled_hist", torch.zeros(_M + 1, dtype=torch.int64))
            self.register_buffer("scaled_outside", torch.zeros(2, dtype=torch.int64))  # under, over
            self.register_buffer("scaled_max", torch.zeros((), dtype=torch.float64))
        else:
            self.channel_scale = None
            self.scaled_hist = None
        self.probe: tuple[float, Tensor | None, Tensor | None] | None = None
        self.record_stats = True
        # tensor parallelism: (lo, hi, process group) when this rank sees channels [lo, hi) only
        self.shard: tuple[int, int, Any] | None = None
        self._merged: dict[str, Tensor] = {}  # additive statistics as of the last merge_shards
        self.register_buffer("probe_dropped", torch.zeros((), dtype=torch.float64))
        self.register_buffer("probe_tokens", torch.zeros((), dtype=torch.int64))
        self.register_buffer("probe_frac_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("probe_frac_sumsq", torch.zeros((), dtype=torch.float64))

    # -- recording ------------------------------------------------------------------------------
    def set_probe(self, threshold: float, center: Tensor | None, channel_scale: Tensor | None,
                  *, stats: bool = True) -> None:
        """Also count exactly which entries the op would drop with these settings.

        ``stats=False`` records only that count (evaluation needs no histograms, and skipping
        them makes a probe several times cheaper).
        """
        self.probe = (float(threshold), center, channel_scale)
        self.record_stats = stats
        # a probe alone needs no histograms (512 KiB each): empty until statistics are asked for
        sizes = {"signed_hist": 2 * _M + 1, "scaled_hist": _M + 1}
        for name, size in sizes.items():
            h = getattr(self, name, None)
            if h is None:
                continue
            if not stats and not h.any():
                setattr(self, name, h.new_zeros(0))
            elif stats and h.numel() == 0:
                setattr(self, name, h.new_zeros(size))

    # -- tensor parallelism ---------------------------------------------------------------------
    _ADDITIVE = ("signed_hist", "signed_outside", "ch_sum", "ch_sumsq", "scaled_hist", "scaled_outside")
    _MAXED = ("abs_max", "ch_absmax", "scaled_max")

    def set_shard(self, lo: int, hi: int, group: Any) -> None:
        """This rank sees input channels ``[lo, hi)`` only (a row-parallel layer's input slice
        under tensor parallelism); ``merge_shards`` combines the ranks of ``group``."""
        if not 0 <= lo < hi <= self.in_features:
            raise ValueError(f"observer {self.name}: shard [{lo}, {hi}) outside {self.in_features} channels")
        self.shard = (lo, hi, group)

    @torch.no_grad()
    def merge_shards(self) -> None:
        """Combine the statistics the ranks of the shard's group recorded on their slices, so
        every rank holds those of the whole input: histograms and counts add up, per-channel
        sums sit at each rank's channels (zero elsewhere) and add up to the concatenation in
        rank order, maxima take the maximum. Only what was recorded since the last merge is
        added, so merging again after more calibration counts nothing twice. Every rank of the
        group must call it (a collective); observers without a shard return at once."""
        if self.shard is None:
            return
        import torch.distributed as dist

        group = self.shard[2]
        for name in self._ADDITIVE:
            buf = getattr(self, name, None)
            if buf is None or buf.numel() == 0:
                continue
            base = self._merged.get(name)
            delta = buf.clone() if base is None or base.shape != buf.shape else buf - base
            dist.all_reduce(delta, op=dist.ReduceOp.SUM, group=group)
            buf.copy_(delta if base is None or base.shape != buf.shape else base + delta)
            self._merged[name] = buf.clone()
        for name in self._MAXED:
            buf = getattr(self, name, None)
            if buf is not None:
                dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)

    def _channels(self) -> tuple[int, int]:
        return (self.shard[0], self.shard[1]) if self.shard is not None else (0, self.in_features)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        lo, hi = self._channels()
        if x.shape[-1] != hi - lo:
            raise ValueError(
                f"observer {self.name}: input has {x.shape[-1]} features, expected {hi - lo}"
                + (f" (channels [{lo}, {hi}) of {self.in_features})" if self.shard is not None else "")
            )
        if self.signed_hist.device != x.device:
            self.to(x.device)
        v = x.detach()
        mask = _TOKENS.get()
        if mask is not None and v.dim() >= 3 and tuple(v.shape[:2]) == tuple(mask.shape):
            v = v[mask.to(v.device)]  # the batch's real tokens only, not its padding
        v = v.reshape(-1, hi - lo).float()
        if self.record_stats:
            f = v
            if self._record_signed(v):  # rare: keep inf/NaN out of the channel statistics
                f = torch.where(torch.isfinite(v), v, torch.zeros((), device=v.device))
            self.ch_count += f.shape[0]
            self.ch_sum[lo:hi] += f.sum(0)
            self.ch_sumsq[lo:hi] += (f * f).sum(0)
            col_max = f.abs().amax(0)
            absmax = self.ch_absmax[lo:hi]
            torch.maximum(absmax, col_max.double(), out=absmax)
            torch.maximum(self.abs_max, self.ch_absmax.max(), out=self.abs_max)
            if self.scaled_hist is not None:
                m = (f - self.scale_center).abs() * self.channel_scale[lo:hi].to(v.device)
                keys = (m.reshape(-1).view(torch.int32) >> _KEY_SHIFT).long()
                h = torch.bincount(_table(_MAG_TABLE, v.device)[keys], minlength=_MAG_OVER + 1)
                self._fold(self.scaled_hist, self.scaled_outside, h, _M + 1, _MAG_FOLD)
                torch.maximum(self.scaled_max, m.max().double(), out=self.scaled_max)
        if self.probe is not None:
            # on the raw input, not ``f``: the op keeps inf and NaN (NaN < tau is False)
            thr, c, s = self.probe
            c = None if c is None else (c[lo:hi] if c.dim() else c).to(v.device)
            s = None if s is None else s[lo:hi].to(v.device)
            per_token = (drop_score(v, c, s) < thr).double().sum(1)
            if self.shard is not None:  # the whole row's count: the ranks' slices add up
                import torch.distributed as dist

                dist.all_reduce(per_token, op=dist.ReduceOp.SUM, group=self.shard[2])
            frac = per_token / self.in_features
            self.probe_dropped += per_token.sum()
            self.probe_tokens += v.shape[0]
            self.probe_frac_sum += frac.sum()
            self.probe_frac_sumsq += (frac**2).sum()
        return x

    def _record_signed(self, v: Tensor) -> bool:
        """Add ``v`` to the signed histogram; True if it held inf or NaN (not counted)."""
        keys = ((v.reshape(-1).view(torch.int32) >> _KEY_SHIFT) & 0x1FFFF).long()
        h = torch.bincount(_table(_SIGNED_TABLE, v.device)[keys], minlength=_S_POS_OVER + 1)
        self._fold(self.signed_hist, self.signed_outside, h, 2 * _M + 1, _SIGNED_FOLD)
        return bool(h[_S_NONFINITE] > 0)

    @staticmethod
    def _fold(hist: Tensor, outside: Tensor, h: Tensor, n: int, fold: Tensor) -> None:
        """Add bincount ``h`` to ``hist`` (its first ``n`` slots) and its out-of-range slots
        (the last ``len(fold)``) both to ``outside`` and to the bins ``fold`` names."""
        extra = h[-len(fold):]
        hist += h[:n]
        hist.index_add_(0, _table(fold, h.device), extra)
        outside += extra

    def _warn_outside(self, what: str, points: list[float], under: int,
                      over: list[tuple[float, float, int]]) -> None:
        """Warn when a threshold's interval ends at ``points`` fall where out-of-range values
        were lumped: in the zero bin with ``under`` of them, or in a top bin ``(lo, hi, count)``."""
        zero = 2.0**LOG2_MIN
        hit = under and any(-zero < p < zero for p in points)
        hit = hit or any(k and lo < p < hi for lo, hi, k in over for p in points)
        if hit:
            warnings.warn(
                f"observer {self.name}: {what} falls among values outside the histogram's range "
                f"2^{LOG2_MIN}..2^{LOG2_MAX} ({under} below, {sum(k for *_, k in over)} above), "
                "whose position within their bin is unknown: the achieved sparsity may miss "
                "the target",
                stacklevel=3,
            )

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()

    # -- derived quantities ---------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.signed_hist.sum())

    def _signed_cdf(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin edges (ascending, 2*_M+2) and cumulative counts at them (linear within bins)."""
        top = float(self.abs_max)
        pos = _magnitude_edges(top)
        zero = 2.0**LOG2_MIN
        # bins in index order: negative (most negative first), the zero bin, positive
        edges = np.concatenate([-pos[::-1], [-zero, zero], pos])
        h = self.signed_hist.double().cpu().numpy()
        cum = np.concatenate([[0.0], np.cumsum(h)])
        return edges, cum

    def _require_data(self) -> float:
        n = float(self.signed_hist.sum())
        if n == 0:
            raise RuntimeError(f"observer {self.name}: no activations were recorded")
        return n

    def cdf(self, values: np.ndarray) -> np.ndarray:
        """Estimated P(X < v) for each v."""
        n = self._require_data()
        edges, cum = self._signed_cdf()
        return np.interp(values, edges, cum) / n

    def sparsity_at(self, threshold: float, center: float = 0.0) -> float:
        """Estimated fraction with |x - center| < threshold."""
        c = float(center)
        t = float(threshold)
        return float(self.cdf(np.array([c + t]))[0] - self.cdf(np.array([c - t]))[0])

    def threshold_for(self, sparsity: float, center: float = 0.0) -> float:
        """tau with P(|X - center| < tau) = sparsity (NNCF's Quantile(|X - c|, s))."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"observer {self.name}: sparsity must be in [0, 1), got {sparsity}")
        if sparsity == 0.0:
            return 0.0
        n = self._require_data()
        edges, cum = self._signed_cdf()
        # P(|X - c| < t) is piecewise linear in t, kinked where c +- t meets an edge: solve on
        # the segment that crosses the target (exact at any scale, unlike a fixed bisection)
        c = float(center)
        t = np.unique(np.concatenate([[0.0], np.abs(edges - c)]))
        at = (np.interp(c + t, edges, cum) - np.interp(c - t, edges, cum)) / n
        k = min(int(np.searchsorted(at, sparsity, side="left")), len(t) - 1)  # at[0] = 0 < s <= at[-1] = 1
        tau = float(t[k - 1] + (sparsity - at[k - 1]) / (at[k] - at[k - 1]) * (t[k] - t[k - 1]))
        under, neg, pos = self.signed_outside.tolist()
        top = edges[-1]
        self._warn_outside(f"the threshold for sparsity {sparsity:g}", [c - tau, c + tau], under,
                           [(-top, edges[1], neg), (edges[-2], top, pos)])
        return tau

    def scaled_threshold_for(self, sparsity: float) -> float:
        """tau with P(|X - c0| * scale < tau) = sparsity, from the scaled histogram."""
        if self.scaled_hist is None:
            raise RuntimeError(f"observer {self.name}: built without channel_scale")
        if sparsity == 0.0:
            return 0.0
        h = self.scaled_hist.double().cpu().numpy()
        n = h.sum()
        if n == 0:
            raise RuntimeError(f"observer {self.name}: no activations were recorded")
        edges = np.concatenate([[0.0, 2.0**LOG2_MIN], _magnitude_edges(float(self.scaled_max))])
        cum = np.concatenate([[0.0], np.cumsum(h)]) / n
        tau = float(np.interp(sparsity, cum, edges))
        under, over = self.scaled_outside.tolist()
        self._warn_outside(f"the scaled threshold for sparsity {sparsity:g}", [tau], under,
                           [(edges[-2], edges[-1], over)])
        return tau

    def quantile(self, q: float) -> float:
        """Value v with P(X < v) = q (e.g. the median for q = 0.5)."""
        self._require_data()
        edges, cum = self._signed_cdf()
        v = float(np.interp(q * cum[-1], cum, edges))
        top = float(self.abs_max)  # q = 1 would give the grid's end, past the empty top bins
        return min(max(v, -top), top)

    def density_peak(self, grid: int = 4096) -> float:
        """Mode of a Gaussian-kernel density estimate (SCAP's "kde" center, seed 001).

        The histogram is resampled on a uniform grid between the 0.1% and 99.9% quantiles and
        smoothed with Silverman's bandwidth on a robust spread (min of std and IQR / 1.34),
        never narrower than two grid steps.
        """
        n = self._require_data()
        lo, hi = self.quantile(0.001), self.quantile(0.999)
        if not hi > lo:
            return lo
        xs = np.linspace(lo, hi, grid + 1)
        dens = np.diff(self.cdf(xs)) / np.diff(xs)
        mids = 0.5 * (xs[1:] + xs[:-1])
        mean = float(self.ch_sum.sum()) / max(float(self.ch_count) * self.in_features, 1.0)
        var = float(self.ch_sumsq.sum()) / max(float(self.ch_count) * self.in_features, 1.0)
        std = math.sqrt(max(var - mean * mean, 0.0))
        iqr = self.quantile(0.75) - self.quantile(0.25)
        spread = min(std, iqr / 1.34) if iqr > 0 else std
        step = xs[1] - xs[0]
        bw = max(1.06 * spread * n ** (-0.2), 2 * step)
        half = int(min(4 * bw / step, grid))
        k = np.exp(-0.5 * ((np.arange(-half, half + 1) * step) / bw) ** 2)
        smooth = np.convolve(dens, k / k.sum(), mode="same")
        return float(mids[int(np.argmax(smooth))])

    def probe_stats(self) -> dict[str, float]:
        """Exact dropped fraction over all entries, and the per-token mean and std of it."""
        tokens = int(self.probe_tokens)
        if tokens == 0:
            return {"sparsity": float("nan"), "token_mean": float("nan"), "token_std": float("nan"),
                    "tokens": 0}
        mean = float(self.probe_frac_sum) / tokens
        var = max(float(self.probe_frac_sumsq) / tokens - mean * mean, 0.0)
        return {
            "sparsity": float(self.probe_dropped) / (tokens * self.in_features),
            "token_mean": mean,
            "token_std": math.sqrt(var),
            "tokens": tokens,
        }

    def extra_repr(self) -> str:
        return f"{self.name}, in_features={self.in_features}, count={self.count}"
