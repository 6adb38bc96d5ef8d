"""Measured crossovers: from how many rows the 2:4 prefill path beats dense, and whether the
one-row sparse GEMV beats dense at all for a layer's shape and target sparsity.

``crossover_rows(n, k, dtype, device, graphs=...)`` times dense ``F.linear`` against
``sparse24_linear`` at M in ``MEASURE_ROWS`` (CUDA-graph replays when the model runs under CUDA
graphs, eager calls otherwise: torch's cuSPARSELt call sets up its plan on every call, so eagerly
2:4 rarely pays) and returns the smallest M from which 2:4 is at least ``MARGIN`` (2%) faster at
every larger M, or ``NEVER``. ``gemv_pays(n, k, dtype, device, sparsity)`` times one row of the
sparse GEMV against ``F.linear`` under CUDA graphs, weights rotated out of L2: small weights lose
(the kernel's fixed cost exceeds what skipping saves), and ``lower_linears`` and
``prepare_weights`` run those layers dense. Both measure once per GPU, shape, dtype (and
sparsity, mode) and torch / Triton / cuSPARSELt versions, and cache in
``$FXSPARSE_CACHE_DIR/crossover.json`` (default ``~/.cache/fxsparse``), written atomically under
an advisory ``flock``. On CPU, without cuSPARSELt, during capture, or for shapes a path cannot
take, nothing is measured (2:4: never; GEMV: pays, the op decides per call).
Kernels never import passes: this module sees shapes, dtypes and devices only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from ..fileio import write_text_atomic
from . import sparse24, sparse_gemv
from .timing import gpu_environment, time_calls

try:
    import fcntl
except ImportError:  # not POSIX: writes go unlocked (concurrent writers may drop entries)
    fcntl = None

__all__ = ["NEVER", "MEASURE_ROWS", "MARGIN", "crossover_rows", "crossover_from_times",
           "resolve_min_rows_24", "cache_path", "environment", "gemv_pays"]

log = logging.getLogger("fxsparse")

NEVER = 1 << 62
MEASURE_ROWS = (256, 512, 1024, 2048, 4096, 8192, 16384)
MARGIN = 0.02
GEMV_REVISION = 3  # part of the GEMV cache key: bump when sparse_gemv's speed changes
CACHE_FORMAT = "fxsparse.crossover"
CACHE_VERSION = 1

_memo: dict[str, object] = {}


def cache_path() -> Path:
    root = os.environ.get("FXSPARSE_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "fxsparse"
    return base / "crossover.json"


def environment(device: torch.device) -> dict:
    """What a measurement depends on besides the shape (part of the cache key)."""
    return {**gpu_environment(device), "impl": sparse24.SPARSE24_IMPL}


def _key(env: Mapping, n: int, k: int, dtype: torch.dtype, epilogue: bool, graphs: bool) -> str:
    parts = [f"{name}={env[name]}" for name in sorted(env)]
    return "|".join([*parts, f"n={n}", f"k={k}", f"dtype={str(dtype).removeprefix('torch.')}",
                     f"epilogue={int(epilogue)}", f"graphs={int(graphs)}"])


def crossover_from_times(times: Mapping[int, tuple[float, float]], margin: float = MARGIN) -> int:
    """Smallest M from which ``sparse <= (1 - margin) * dense`` at every larger measured M.

    ``times``: ``{M: (dense, sparse)}`` in any time unit; ``NEVER`` if the largest M loses.
    """
    best = NEVER
    for m in sorted(times, reverse=True):
        dense, sparse = times[m]
        if not (sparse <= (1.0 - margin) * dense):  # NaN loses
            break
        best = m
    return best


# -- the cache file ---------------------------------------------------------------------------


def _read_cache(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
            raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise ValueError("'entries' is not an object")
        return entries
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("fxsparse: ignoring unreadable crossover cache %s (%s); measuring again", path, e)
        return {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path.lock`` (a sidecar: ``path`` itself is replaced by
    rename, so a lock on it would not exclude the next writer). Readers need no lock."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # a file system without locks: write unlocked, as without fcntl
            pass
        yield  # closing the file releases the lock


def _write_entry(path: Path, key: str, entry: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            entries = _read_cache(path)  # under the lock: another process may have added entries
            entries[key] = entry
            text = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries},
                              indent=1, sort_keys=True)
            write_text_atomic(path, text)
    except OSError as e:  # read-only home and the like: the in-memory cache still holds it
        log.warning("fxsparse: could not write the crossover cache %s (%s)", path, e)


def _entry_rows(entry: object) -> int | None:
    if isinstance(entry, dict) and "rows" in entry:
        r = entry["rows"]
        if r is None:
            return NEVER
        if isinstance(r, int) and not isinstance(r, bool) and r >= 0:
            return r
    return None


# -- measuring --------------------------------------------------------------------------------


def _measure(n: int, k: int, dtype: torch.dtype, device: torch.device, epilogue: bool,
             graphs: bool = False, rows: tuple[int, ...] = MEASURE_ROWS) -> dict[int, tuple[float, float]]:
    """``{M: (dense µs, 2:4 µs)}``; stops at the first M that does not fit in memory."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    times: dict[int, tuple[float, float]] = {}
    with unset_fake_temporarily(), torch.no_grad(), torch.cuda.device(device):
        gen = torch.Generator(device=device).manual_seed(0)
        w = (torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dtype)
        bias = torch.randn(n, device=device, generator=gen).to(dtype) if epilogue else None
        center = torch.tensor(0.05, device=device) if epilogue else None
        cbias = F.linear(center.to(dtype).expand(k), w).float() if epilogue else None
        for m in rows:
            try:
                # rotate inputs so that small ones are not all served from L2
                nbuf = max(1, min(4, (64 << 20) // (m * k * 2)))
                xs = [torch.randn(m, k, device=device, generator=gen).to(dtype) for _ in range(nbuf)]
                # graphs: GPU time only (mode="reduce-overhead"); else eager calls, whose host
                # work counts too (torch's cuSPARSELt call sets up its plan every time, ~1 ms)
                dense, _ = time_calls([lambda x=x: F.linear(x, w, bias) for x in xs], min_ms=1.0,
                                      graphs=graphs)
                sparse, _ = time_calls(
                    [lambda x=x: sparse24.sparse24_linear(x, w, bias, center, cbias) for x in xs],
                    min_ms=1.0, graphs=graphs)
            except torch.cuda.OutOfMemoryError:
                log.warning("fxsparse: crossover measurement for %dx%d stopped at M=%d (out of memory)",
                            n, k, m)
                break
            finally:
                xs = None
            times[m] = (dense, sparse)
    return times


def crossover_rows(n: int, k: int, dtype: torch.dtype, device: torch.device | str,
                   epilogue: bool = False, graphs: bool = False) -> int:
    """Row count from which the 2:4 path runs for an ``[n, k]`` weight (see module docstring).
    Row counts between two measured points follow the larger one's verdict (the crossover is the
    first point of a winning tail); a corrupt cache file is reported and measured again.

    ``epilogue``: the layer adds a bias or a center term (one more pass over the output).
    ``graphs``: the model runs under CUDA graphs (``mode="reduce-overhead"``), so GPU time
    decides; otherwise eager calls, whose host work counts too.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    reason = _unsupported(n, k, dtype, device)
    if reason is not None:
        sparse24.log_once(f"fxsparse: 2:4 prefill for {n}x{k} {dtype} runs dense: {reason}")
        return NEVER
    key = _key(environment(device), n, k, dtype, epilogue, graphs)
    if key in _memo:
        return _memo[key]
    path = cache_path()
    rows = _entry_rows(_read_cache(path).get(key))
    if rows is None:
        t0 = time.perf_counter()
        times = _measure(n, k, dtype, device, epilogue, graphs)
        rows = crossover_from_times(times)
        log.info("fxsparse: 2:4 crossover for %dx%d %s: %s (measured in %.1f s)", n, k, dtype,
                 "never" if rows >= NEVER else rows, time.perf_counter() - t0)
        _write_entry(path, key, {
            "rows": None if rows >= NEVER else rows,
            "times_us": {str(m): [round(d, 3), round(s, 3)] for m, (d, s) in times.items()},
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
    _memo[key] = rows
    return rows


def _unsupported(n: int, k: int, dtype: torch.dtype, device: torch.device) -> str | None:
    reason = sparse24.unsupported_reason(n, k, dtype, device)
    if reason is None and torch.cuda.is_current_stream_capturing():
        reason = "cannot measure while a CUDA graph is being captured"
    return reason


def resolve_min_rows_24(n: int, k: int, dtype: torch.dtype, device: torch.device | str,
                        override: int | None = None, epilogue: bool = False, graphs: bool = False) -> int:
    """``override`` when given, else the measured crossover on CUDA, else ``NEVER``."""
    if override is not None:
        return int(override)
    if torch.device(device).type != "cuda":
        return NEVER
    return crossover_rows(n, k, dtype, device, epilogue, graphs)


# -- the one-row sparse GEMV against dense ------------------------------------------------------


def _measure_gemv(n: int, k: int, dtype: torch.dtype, device: torch.device, sparsity: float
                  ) -> tuple[float, float]:
    """(dense µs, sparse GEMV µs) for one row, CUDA-graph medians, weights rotated out of L2."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad(), torch.cuda.device(device):
        gen = torch.Generator(device=device).manual_seed(0)
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        copies = max(2, min(64, -(-3 * l2 // (n * k * dtype.itemsize))))
        w_rm = [(torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dtype)
                for _ in range(copies)]
        w_cm = [w.t().contiguous().t() for w in w_rm]
        xs = [torch.randn(1, k, device=device, generator=gen).to(dtype) for _ in range(copies)]
        thr = [float(torch.quantile(x.float().abs(), sparsity)) if sparsity > 0 else 0.0 for x in xs]
        dense, _ = time_calls([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, w_rm, strict=True)],
                              min_ms=2.0, graphs=True)
        sparse, _ = time_calls([lambda x=x, w=w, t=t: sparse_gemv.threshold_gemv(x, w, None, t)
                                for x, w, t in zip(xs, w_cm, thr, strict=True)], min_ms=2.0, graphs=True)
    return dense, sparse


def gemv_pays(n: int, k: int, dtype: torch.dtype, device: torch.device | str,
              sparsity: float | None) -> tuple[bool, tuple[float, float] | None]:
    """Whether the sparse GEMV beats dense for an ``[n, k]`` weight at ``sparsity`` (one row),
    and the measured ``(dense µs, sparse µs)``; ``(True, None)`` when nothing was measured."""
    device = torch.device(device)
    if device.type != "cuda" or sparsity is None or dtype not in sparse_gemv._DTYPES:
        return True, None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.is_current_stream_capturing():
        return True, None
    key = f"gemv{GEMV_REVISION}|" + _key(environment(device), n, k, dtype, False, True) + f"|s={sparsity:.2f}"
    if key in _memo:
        return _memo[key]
    path = cache_path()
    entry = _read_cache(path).get(key)
    times = entry.get("times_us") if isinstance(entry, dict) else None
    if not (isinstance(times, list) and len(times) == 2 and all(isinstance(t, float) for t in times)):
        t0 = time.perf_counter()
        try:
            times = list(_measure_gemv(n, k, dtype, device, round(sparsity, 2)))
        except RuntimeError as e:  # out of memory, a capture refused: keep the kernel, don't fail
            log.warning("fxsparse: could not time the sparse GEMV for %dx%d (%s): keeping it", n, k,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            return True, None
        log.info("fxsparse: sparse GEMV %dx%d %s at s=%.2f: %.1f us vs dense %.1f us (%.1f s)", n, k,
                 dtype, sparsity, times[1], times[0], time.perf_counter() - t0)
        _write_entry(path, key, {"times_us": [round(t, 3) for t in times],
                                 "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    dense, sparse = times
    result = (bool(sparse <= (1.0 - MARGIN) * dense), (dense, sparse))
    _memo[key] = result
    return result
