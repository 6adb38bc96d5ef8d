"""Decode speed: the lean greedy loop, dense (Inductor) vs sparse_act, and where the time goes.

The lean loop is gpt-fast's: a static KV cache, one compiled decode step (model forward and
argmax on device), the next position bumped in place, nothing else per step. Per-step times
come from CUDA events recorded at each step start (no host synchronisation inside the loop, so
the host may run ahead of the GPU as in real serving); the host time of each call (Dynamo guards,
CUDA-graph bookkeeping, input copies) is recorded separately.

    step = compile_step(model, plan, mode="reduce-overhead")      # plan=None: dense Inductor
    res = lean_decode(model, step, prompt, new_tokens=128)         # DecodeTiming
    prof = profile_lean(model, step, prompt, steps=8)              # kernel time by family

``profile_*`` run ``torch.profiler`` over a few steps and split GPU kernel time into families
(``kernel_family``: the sparse GEMV Triton kernel, cuBLAS, attention, other kernels,
memcpy/memset); step time minus GPU busy time is the host-side gap. ``hf_decode`` times
Hugging Face ``generate`` with a static cache and a ``compile_config``.
``fxsparse bench`` and ``bench/decode.py`` are built on these pieces.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
import types
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .plan import SparsityPlan

__all__ = [
    "FAMILIES",
    "DecodeTiming",
    "compare_decode",
    "compile_step",
    "decode_sparsity",
    "hf_decode",
    "kernel_family",
    "lean_decode",
    "linear_weight_bytes",
    "make_cache",
    "profile_hf",
    "profile_lean",
    "summarize_trace",
    "weight_bytes_per_step",
]

FAMILIES = ("sparse_gemv", "gemm", "attention", "other", "memcpy", "collective")

# User Triton kernels show up under their Python name (``_threshold_gemv_kernel``); Inductor's
# start with ``triton_``; cuBLAS's are C++ (``void gemv2T_kernel_val<...>``) or ``nvjet_*``.
SPARSE_KERNEL = re.compile(r"gemv|threshold|sparse|fxsparse", re.I)
GEMM_KERNEL = re.compile(r"gemm|gemv|nvjet|cublas|cutlass|xmma|splitk|sm\d\d_|matmul|mm_", re.I)
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|sdpa", re.I)
# NCCL's kernels (``ncclDevKernel_AllReduce_Sum_bf16_RING_LL(...)``): tensor parallelism's all-reduces
COLLECTIVE_KERNEL = re.compile(r"^nccl|allreduce|all_reduce|allgather|reducescatter", re.I)
# CPU profiles (no kernels): aten ops by self time
_CPU_FAMILIES = (
    ("sparse_gemv", re.compile(r"^fxsparse::")),
    ("gemm", re.compile(r"^aten::(mm|addmm|bmm|matmul|linear|_weight_int)")),
    ("attention", re.compile(r"scaled_dot_product|attention")),
    ("memcpy", re.compile(r"^aten::(copy_|fill_|zero_|clone|_to_copy|index_copy_|index_put_)")),
    ("collective", re.compile(r"^(c10d|_c10d_functional|gloo|nccl)|all_reduce|allreduce", re.I)),
)


def kernel_family(name: str) -> str:
    """The family of a GPU kernel (or memcpy/memset) by its name, one of ``FAMILIES``."""
    if name.startswith(("Memcpy", "Memset", "memcpy", "memset")):
        return "memcpy"
    if COLLECTIVE_KERNEL.search(name):
        return "collective"
    if name.startswith("triton_"):  # Inductor-generated (pointwise, reductions, fused prologues)
        return "other"
    if re.fullmatch(r"[A-Za-z_]\w*", name) and SPARSE_KERNEL.search(name) and not GEMM_KERNEL.search(
            name.replace("gemv", "")):
        return "sparse_gemv"  # a plain identifier: a user Triton kernel
    if ATTENTION_KERNEL.search(name):
        return "attention"
    if GEMM_KERNEL.search(name):
        return "gemm"
    return "other"


def _cpu_family(name: str) -> str | None:
    for fam, pat in _CPU_FAMILIES:
        if pat.search(name):
            return fam
    return "other" if name.startswith("aten::") else None


def summarize_trace(events: Sequence[Mapping[str, Any]], steps: int, top: int = 8) -> dict[str, Any]:
    """Per-step GPU time by family from Chrome-trace events (``torch.profiler`` export).

    Returns ``{"kernel_us": {family: us per step}, "busy_us": sum, "kernels": launches per step,
    "runtime": {CUDA runtime call: count per step}, "top_kernels": [(name, us per step)],
    "kernel_counts": {name: launches per step} (of the top kernels), "host_top": [(name, us per step)]}``.
    Kernels of one stream do not overlap, so their summed duration is the GPU busy time.
    """
    fam_us: dict[str, float] = dict.fromkeys(FAMILIES, 0.0)
    kern: Counter = Counter()
    kern_n: Counter = Counter()
    kernels = 0
    runtime: Counter = Counter()
    host: Counter = Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name, dur = e.get("cat", ""), e.get("name", ""), float(e.get("dur", 0.0))
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            fam = "memcpy" if cat != "kernel" else kernel_family(name)
            fam_us[fam] += dur
            kern[name[:90]] += dur
            kern_n[name[:90]] += 1
            kernels += 1
        elif cat in ("cuda_runtime", "cuda_driver"):
            runtime[name] += 1
        elif cat in ("user_annotation", "python_function", "cpu_op") and not name.startswith(
                ("ProfilerStep", "PyTorch Profiler")):
            host[name[:90]] += dur
    n = max(steps, 1)
    top_kernels = kern.most_common(top)
    return {
        "kernel_us": {k: v / n for k, v in fam_us.items()},
        "busy_us": sum(fam_us.values()) / n,
        "kernels": kernels / n,
        "runtime": {k: v / n for k, v in runtime.most_common(top)},
        "top_kernels": [(k, v / n) for k, v in top_kernels],
        "kernel_counts": {k: kern_n[k] / n for k, _ in top_kernels},
        "host_top": [(k, v / n) for k, v in host.most_common(top)],
    }


def _summarize_cpu(prof, steps: int, top: int = 8) -> dict[str, Any]:
    """CPU runs have no kernels: aten ops' self time by family (the same keys)."""
    fam_us: dict[str, float] = dict.fromkeys(FAMILIES, 0.0)
    host: Counter = Counter()
    for ev in prof.key_averages():
        fam = _cpu_family(ev.key)
        if fam is not None:
            fam_us[fam] += ev.self_cpu_time_total
        host[ev.key[:90]] += ev.self_cpu_time_total
    n = max(steps, 1)
    return {"kernel_us": {k: v / n for k, v in fam_us.items()}, "busy_us": sum(fam_us.values()) / n,
            "kernels": 0.0, "runtime": {}, "top_kernels": [], "kernel_counts": {},
            "host_top": [(k, v / n) for k, v in host.most_common(top)]}


def _profile(fn: Callable[[], Any], device: str) -> tuple[Any, list[dict]]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    events: list[dict] = []
    if device == "cuda":
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
        finally:
            os.unlink(path)
    return prof, events


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- model pieces ---------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_cache(model: nn.Module, max_len: int):
    """A ``StaticCache`` for ``model`` (allocated on its first, eager, update)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def _greedy_step(self, input_ids, cache_position, past_key_values):
    out = self(input_ids=input_ids, past_key_values=past_key_values, cache_position=cache_position,
               use_cache=True)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def compile_step(model: nn.Module, plan: SparsityPlan | None = None, *, mode: str | None = None,
                 backend: str = "inductor", **options: Any) -> Callable:
    """The decode step ``(tokens [B, 1], position [1], cache) -> next tokens [B, 1]``, compiled.

    With a plan: ``sparse_act`` (weights must already be prepared, ``fxsparse.prepare_weights``);
    without: ``backend`` (Inductor). The step is a method bound to ``model``, so compiled graphs
    name layers as ``model.named_modules()`` does (``model.layers.0.mlp.up_proj``).
    """
    step = types.MethodType(_greedy_step, model)
    if plan is None:
        return torch.compile(step, backend=backend, mode=mode, options=options or None)
    opts = {"plan": plan, **options} | ({"mode": mode} if mode else {})
    return torch.compile(step, backend="sparse_act", options=opts)


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of each linear layer's weight (and bias): what a decode step reads per layer.

    A tied ``lm_head`` counts (it reads the whole embedding matrix); embeddings do not (a step
    gathers B rows). An 8-bit torchao weight counts its data and scales.
    """
    from .quantized import is_torchao, weight_format

    def nbytes(p: torch.Tensor) -> int:
        fmt = weight_format(p) if is_torchao(p) else None
        if fmt is not None and fmt.quantized:
            return fmt.qdata.numel() * fmt.qdata.element_size() + p.scale.numel() * p.scale.element_size()
        return p.numel() * p.element_size()

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            out[name] = sum(nbytes(p) for p in m.parameters(recurse=False))
    return out


def weight_bytes_per_step(model: nn.Module, sparsity: Mapping[str, float] | None = None) -> int:
    """Linear weight bytes a step must read when layer ``n`` skips ``sparsity[n]`` of its columns."""
    sparsity = sparsity or {}
    return int(sum(b * (1.0 - sparsity.get(n, 0.0)) for n, b in linear_weight_bytes(model).items()))


class _SparsityProbe:
    """Counts, per call, each row's dropped share and the share dropped by every row (union)."""

    def __init__(self, threshold: float, center, scale):
        self.threshold, self.center, self.scale = threshold, center, scale
        self.active = False
        self.row = self.union = None
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> None:
        if not self.active:
            return
        from .kernels import keep_mask_reference

        rows = x.reshape(-1, x.shape[-1])
        c = None if self.center is None else self.center.to(x.device)
        s = None if self.scale is None else self.scale.to(x.device)
        drop = ~keep_mask_reference(rows, self.threshold, c, s)
        row, union = drop.float().mean(), drop.all(0).float().mean()
        self.row = row if self.row is None else self.row + row
        self.union = union if self.union is None else self.union + union
        self.calls += 1


@torch.no_grad()
def decode_sparsity(model: nn.Module, plan: SparsityPlan, prompt: torch.Tensor, steps: int = 8
                    ) -> dict[str, dict[str, float]]:
    """Per planned layer, the sparsity of its inputs over ``steps`` greedy decode steps after
    ``prompt`` (eager, with the plan applied by hooks): ``{"sparsity": mean over rows,
    "union": share of channels that every row of the step drops}`` (equal at batch 1)."""
    from .reference import plan_hooks

    probes = {n: _SparsityProbe(lp.threshold, lp.center_tensor(), lp.scale_tensor())
              for n, lp in plan.layers.items() if lp.method != "topk"}
    cache = make_cache(model, prompt.shape[1] + steps + 1)
    dev = prompt.device
    with plan_hooks(model, plan, probes=probes):
        pos = torch.arange(prompt.shape[1], device=dev)
        tok = model(input_ids=prompt, past_key_values=cache, cache_position=pos,
                    use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        for p in probes.values():
            p.active = True
        for i in range(steps):
            pos = torch.tensor([prompt.shape[1] + i], device=dev)
            tok = _greedy_step(model, tok, pos, cache)
    return {n: {"sparsity": (p.row / p.calls).item(), "union": (p.union / p.calls).item()}
            for n, p in probes.items() if p.calls}


# -- the lean loop ------------------------------------------------------------------------------


@dataclass
class DecodeTiming:
    """One lean decode run: per-step times (ms), host time per call (ms), the tokens."""

    step_ms: list[float]
    host_ms: list[float]
    wall_ms: float  # whole loop, synchronised at the end
    tokens: torch.Tensor = field(repr=False)

    def median_ms(self, skip: int = 2) -> float:
        return statistics.median(self.step_ms[skip:] if len(self.step_ms) > skip + 2 else self.step_ms)

    def host_median_ms(self, skip: int = 2) -> float:
        return statistics.median(self.host_ms[skip:] if len(self.host_ms) > skip + 2 else self.host_ms)

    def summary(self) -> dict[str, float]:
        return {"ms_per_step": self.median_ms(), "ms_per_step_mean": self.wall_ms / len(self.step_ms),
                "host_ms_per_step": self.host_median_ms()}


@torch.no_grad()
def lean_decode(model: nn.Module, step: Callable, prompt: torch.Tensor, new_tokens: int, *,
                cache=None, cuda_graphs: bool | None = None) -> DecodeTiming:
    """Prefill ``prompt`` eagerly, then run ``new_tokens`` greedy steps of ``step``.

    ``cache``: a ``make_cache`` result to reuse (it is reset), else a new one. ``cuda_graphs``
    (default: on CUDA) marks a CUDA-graph step boundary before each call and clones the output
    (the graph reuses its buffer). No host synchronisation inside the loop: step times are the
    intervals between CUDA events recorded at each step start.
    """
    dev = prompt.device
    cuda = dev.type == "cuda"
    graphs = cuda if cuda_graphs is None else cuda_graphs
    if cache is None:
        cache = make_cache(model, prompt.shape[1] + new_tokens + 1)
    else:
        cache.reset()
    plen = prompt.shape[1]
    tok = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(plen, device=dev),
                use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    pos = torch.tensor([plen], device=dev)
    toks = [tok]
    host: list[float] = []
    marks: list[Any] = []
    events = [torch.cuda.Event(enable_timing=True) for _ in range(new_tokens + 1)] if cuda else []
    _sync(dev.type)
    t0 = time.perf_counter()
    for i in range(new_tokens):
        h = time.perf_counter()
        if cuda:
            events[i].record()
            marks.append(events[i])
        else:
            marks.append(h)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        tok = step(tok, pos, cache)
        if graphs:
            tok = tok.clone()
        pos.add_(1)
        toks.append(tok)
        host.append((time.perf_counter() - h) * 1e3)
    if cuda:
        events[new_tokens].record()
        marks.append(events[new_tokens])
    _sync(dev.type)
    end = time.perf_counter()
    if cuda:
        step_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)]
    else:
        ts = [*marks, end]
        step_ms = [(b - a) * 1e3 for a, b in zip(ts, ts[1:], strict=False)]
    return DecodeTiming(step_ms, host, (end - t0) * 1e3, torch.cat(toks, 1))


def profile_lean(model: nn.Module, step: Callable, prompt: torch.Tensor, steps: int = 8, *,
                 cache=None, cuda_graphs: bool | None = None, top: int = 8) -> dict[str, Any]:
    """Kernel time per step by family over ``steps`` lean steps: a run of ``steps`` steps and a
    prefill-only run are profiled, and their difference divided by ``steps``
    (``summarize_trace``; on CPU, aten ops' self time); ``top`` kernels and host ops listed."""
    dev = prompt.device.type
    if cache is None:
        cache = make_cache(model, prompt.shape[1] + steps + 1)

    def run(n: int) -> Callable[[], DecodeTiming]:
        return lambda: lean_decode(model, step, prompt, n, cache=cache, cuda_graphs=cuda_graphs)

    return _profile_difference(run(0), run(steps), steps, dev, top)


def _profile_difference(short: Callable, long: Callable, steps: int, device: str,
                        top: int = 8) -> dict[str, Any]:
    """Profile ``short`` and ``long`` (``steps`` more decode steps); per-step = difference."""
    prof_a, ev_a = _profile(short, device)
    prof_b, ev_b = _profile(long, device)
    if device == "cuda":
        a, b = summarize_trace(ev_a, 1, top=10**6), summarize_trace(ev_b, 1, top=10**6)
    else:
        a, b = _summarize_cpu(prof_a, 1, top=10**6), _summarize_cpu(prof_b, 1, top=10**6)

    def diff(key: str) -> list[tuple[str, float]]:
        before = dict(a[key])
        d = [(k, (v - before.get(k, 0.0)) / steps) for k, v in dict(b[key]).items()]
        return sorted((kv for kv in d if kv[1] > 0), key=lambda kv: -kv[1])[:top]

    out = {"kernel_us": {k: (b["kernel_us"][k] - a["kernel_us"][k]) / steps for k in FAMILIES}}
    out["busy_us"] = sum(out["kernel_us"].values())
    out["kernels"] = (b["kernels"] - a["kernels"]) / steps
    out["runtime"] = dict(diff("runtime"))
    out["top_kernels"] = diff("top_kernels")
    counts_a, listed = a.get("kernel_counts", {}), dict(out["top_kernels"])
    out["kernel_counts"] = {k: (n - counts_a.get(k, 0.0)) / steps
                            for k, n in b.get("kernel_counts", {}).items() if k in listed}
    out["host_top"] = diff("host_top")
    if device == "cuda" and out["kernels"] <= 0:
        out["note"] = "no GPU kernels traced in the decode steps (CUDA graph replays hidden?)"
    return out


# -- Hugging Face generate ------------------------------------------------------------------------


def _counter_total(group: str, key: str | None = None) -> int:
    c = torch._dynamo.utils.counters[group]
    return int(c[key] if key is not None else sum(c.values()))


@torch.no_grad()
def hf_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, compile_config, *,
              repeats: int = 2, profile_steps: int = 0) -> dict[str, Any]:
    """Greedy ``model.generate`` with a static cache and ``compile_config`` (transformers
    compiles the decode step); exactly ``new_tokens`` tokens (``min_new_tokens``).

    ``ms_per_step`` times the steps themselves: the median interval between the tokens handed to
    a streamer, over ``repeats`` runs (``generate`` synchronises once per step anyway, to test
    its stopping criteria), so it is positive whatever the machine's load. ``diff_ms_per_step``
    is the cross-check (generate time - prefill-only time) / (new - 1), a difference of two
    medians that noise can make meaningless on a loaded machine. The first call compiles and
    records CUDA graphs (excluded); the compiled forward ``generate`` caches on the model is
    dropped before and after. Also returns the Dynamo graphs compiled while warming up and after
    (``recompiles``, 0 when nothing recompiled per token), and with ``profile_steps`` the
    per-step kernel time by family (``profile_hf``).
    """
    dev = prompt.device.type
    _forget_compiled_call(model)
    try:
        return _hf_decode(model, prompt, new_tokens, compile_config, dev, repeats, profile_steps)
    finally:
        _forget_compiled_call(model)  # and with it, its CUDA graphs


def _forget_compiled_call(model: nn.Module) -> None:
    for attr in ("_compiled_call", "_last_compile_config"):
        if hasattr(model, attr):
            delattr(model, attr)  # generate caches its compiled forward across calls


def _hf_decode(model, prompt, new_tokens, compile_config, dev, repeats, profile_steps):
    kw = dict(do_sample=False, cache_implementation="static", compile_config=compile_config,
              pad_token_id=0, attention_mask=torch.ones_like(prompt))

    def gen(n: int):
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(dev)
        return out

    counters = torch._dynamo.utils.counters
    graphs0 = _counter_total("stats", "unique_graphs")
    t = time.perf_counter()
    out = gen(new_tokens)  # compile + CUDA graph recording, at full cache length
    warm_s = time.perf_counter() - t
    graphs_warm = _counter_total("stats", "unique_graphs") - graphs0
    lowered = int(counters["fxsparse"]["lowered"])

    def timed(n: int) -> float:
        t = time.perf_counter()
        gen(n)
        return (time.perf_counter() - t) * 1e3

    prefill = statistics.median(timed(1) for _ in range(repeats))
    full = statistics.median(timed(new_tokens) for _ in range(repeats))
    gaps: list[float] = []  # ms between consecutive steps' tokens; the first two (prefill) skipped
    for _ in range(repeats):
        st = _TimingStreamer()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=st, **kw)
        _sync(dev)
        gaps += [(b - a) * 1e3 for a, b in zip(st.stamps[2:], st.stamps[3:], strict=False)]
    if not gaps:
        raise ValueError(f"hf_decode: new_tokens={new_tokens} leaves no decode step to time (need >= 3)")
    res: dict[str, Any] = {
        "ms_per_step": statistics.median(gaps), "max_step_ms": max(gaps),
        "diff_ms_per_step": (full - prefill) / max(new_tokens - 1, 1), "prefill_ms": prefill,
        "generate_ms": full, "warmup_s": warm_s, "graphs": graphs_warm,
        "sparse_lowered": lowered, "tokens": out[:, prompt.shape[1]:].cpu(),
    }
    if profile_steps:
        try:  # the timings above must survive a profiler failure
            res["profile"] = profile_hf(model, gen, profile_steps, dev)
        except Exception as e:
            res["profile_error"] = f"{type(e).__name__}: {e}"
    res["recompiles"] = _counter_total("stats", "unique_graphs") - graphs0 - graphs_warm
    res["cudagraph_skips"] = _counter_total("inductor", "cudagraph_skips")
    return res


class _TimingStreamer:
    """A ``generate`` streamer that records when each step's tokens arrive (the first put is the
    prompt)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def profile_hf(model: nn.Module, gen: Callable[[int], Any], steps: int, device: str) -> dict[str, Any]:
    """Kernel time per decode step of ``gen(n)`` (a generate call): profile ``gen(1)`` (prefill
    only) and ``gen(steps + 1)``, and divide the difference by ``steps``."""
    return _profile_difference(lambda: gen(1), lambda: gen(steps + 1), steps, device)


@torch.no_grad()
def compare_decode(model: nn.Module, plan: SparsityPlan, prompt: torch.Tensor, new_tokens: int, *,
                   mode: str | None = None, warmup: int = 4,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Lean decode loop, dense (Inductor) then sparse_act with ``plan``: one row each with
    ``ms_per_step`` (median), ``tokens_per_s``, ``host_ms_per_step``, ``compile_s`` and
    ``vs_dense``. Compilation and ``warmup`` steps are excluded. The sparse run prepares the
    planned weights in place (``prepare_weights``: column-major on CUDA), after the dense run.
    """
    from .prepare import prepare_weights

    plan.check_model(model)
    rows: list[dict[str, Any]] = []
    for label, p in (("dense (Inductor)", None), ("sparse_act", plan)):
        torch.compiler.reset()
        if p is not None:
            prepare_weights(model, p)
        step = compile_step(model, p, mode=mode)
        cache = make_cache(model, prompt.shape[1] + max(new_tokens, warmup) + 1)
        t = time.perf_counter()
        lean_decode(model, step, prompt, warmup, cache=cache)
        compile_s = time.perf_counter() - t
        timing = lean_decode(model, step, prompt, new_tokens, cache=cache)
        ms = timing.median_ms()
        row = {"variant": label, **timing.summary(), "tokens_per_s": prompt.shape[0] * 1e3 / ms,
               "compile_s": compile_s, "tokens": timing.tokens}
        row["vs_dense"] = rows[0]["ms_per_step"] / ms if rows else 1.0
        rows.append(row)
        if log is not None:
            log(f"{label}: {ms:.3f} ms/token ({compile_s:.1f} s to compile and warm up)")
    torch.compiler.reset()
    return rows


def breakdown_row(step_ms: float, prof: Mapping[str, Any]) -> dict[str, float]:
    """Kernel ms per step by family, GPU busy ms and the host gap (step time - busy time)."""
    row = {f"{k}_ms": v / 1e3 for k, v in prof["kernel_us"].items()}
    row["busy_ms"] = prof["busy_us"] / 1e3
    row["gap_ms"] = step_ms - row["busy_ms"]
    row["kernels_per_step"] = prof.get("kernels", 0.0)
    return row


def timing_dict(t: DecodeTiming) -> dict[str, Any]:
    d = asdict(t)
    d.pop("tokens")
    return d
