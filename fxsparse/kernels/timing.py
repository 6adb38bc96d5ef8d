"""GPU timing shared by the crossover measurement and the benchmarks: medians of CUDA events.

``time_calls(calls)`` runs the calls once (warm-up: compilation, algorithm searches, allocator),
then times back-to-back rounds of all of them with CUDA events, enough rounds for ``min_ms`` per
trial, and returns the median µs per call over ``trials`` and the trials' relative spread. With
``graphs=True`` the calls are captured in one CUDA graph and its replays are timed (GPU time
only, as a model compiled with ``mode="reduce-overhead"`` runs them); a call that cannot be
captured raises, and the caller decides what to do.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import torch

__all__ = ["copy_bandwidth", "gpu_environment", "gpu_tag", "time_calls"]


def _rounds(run: Callable[[], None], trials: int, min_ms: float) -> list[float]:
    """ms per ``run()`` over ``trials`` timings of enough back-to-back runs for ``min_ms`` each."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    reps = max(1, math.ceil(min_ms / max(start.elapsed_time(end), 1e-3)))
    times = []
    for _ in range(trials):
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return times


def time_calls(
    calls: Sequence[Callable[[], object]], trials: int = 5, min_ms: float = 10.0, graphs: bool = False
) -> tuple[float, float]:
    """Median µs per call of ``calls`` (run in order, repeatedly) and the trials' relative spread."""
    for c in calls:  # warm-up
        c()
    torch.cuda.synchronize()
    if graphs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        run = g.replay
    else:

        def run() -> None:
            for c in calls:
                c()

    times = [t * 1e3 / len(calls) for t in _rounds(run, trials, min_ms)]
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy of ``nbytes``, bytes read + written per second (TB/s)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us, _ = time_calls([lambda: b.copy_(a)], min_ms=30)
    return 2 * nbytes / (us * 1e-6) / 1e12


def gpu_environment(device: torch.device | int | None = None) -> dict:
    """GPU and library versions a measurement depends on (reported with every figure)."""
    import triton

    props = torch.cuda.get_device_properties(device)
    try:
        cusparselt = torch.backends.cusparselt.version()
    except Exception:  # noqa: BLE001 - builds without cuSPARSELt
        cusparselt = None
    return {
        "gpu": props.name,
        "capability": f"sm{props.major}{props.minor}",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": cusparselt,
    }


def gpu_tag(device: torch.device | int | None = None) -> str:
    """Short name of the GPU for result file names: ``h100``, ``h200``, ... (``gpu`` if unknown)."""
    import re

    m = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", torch.cuda.get_device_properties(device).name)
    return m.group(1).lower() if m else "gpu"
