"""2:4 activation-sparse training of squared-ReLU FFNs (seed 004; docs/training.md).

Method (Haziza et al. 2025, arXiv:2503.16672): each SwiGLU MLP becomes ``up -> ReLU^2 -> down``
(intermediate size x1.5, same parameter count). After a dense warm-up, the forward prunes
``Y2 = ReLU(X W1^T)^2`` to 2:4 along the features (``naive``, ``mvue`` or ``soft_threshold``, see
``kernels/prune24.py``) and multiplies on sparse tensor cores; the backward re-applies the forward
mask (so ``dX = dY1 W1`` is an exact sparse matmul) and prunes the weight-gradient operands 2:4
*along tokens*, in a fixed random token order, for all but the densest ``dense_feature_fraction``
of features. Each pruning ``y_s = D * y`` treats ``D`` (mask, MVUE's ``1/p``, the soft-threshold
scale) as a constant of the forward; the token-wise 2:4 approximates ``dW``.

The step counter is a CPU int64 buffer read by ``fxsparse::sparse24_schedule`` at run time, so the
dense->sparse switch is data, not a guard: one compilation serves both phases, and reading it
costs no device sync. On CPU every op runs its plain-torch reference; on CUDA the pruning runs as
Triton kernels and 2:4 matmuls on cuSPARSELt (``compress24`` + ``torch._cslt_sparse_mm``) when
dtype and shapes allow, else as dense matmuls of the pruned tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import torch
import torch.nn as nn
from torch import Tensor

from .kernels import sparse24
from .kernels.prune24 import METHODS, prune24_tokens_t, relu2_grad24, sparsify24
from .kernels.sparse24 import compress24, cslt_mm

__all__ = [
    "Sparse24Config",
    "SquaredReLU24MLP",
    "convert_to_squared_relu_24",
    "convert_mlp",
    "squared_relu24_ffn",
    "sparse24_schedule",
    "token_permutation",
    "permute_tokens",
    "unpermute_tokens",
    "activation_sparsity",
]


@dataclasses.dataclass(frozen=True)
class Sparse24Config:
    """How a converted MLP trains. Data, serialisable to JSON (``to_json``/``from_json``)."""

    method: str = "mvue"
    dense_warmup_steps: int = 1000
    dense_feature_fraction: float = 0.05
    permute_tokens: bool = True
    permutation_seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dense_warmup_steps < 0:
            raise ValueError(f"dense_warmup_steps must be >= 0, got {self.dense_warmup_steps}")
        if not 0.0 <= self.dense_feature_fraction <= 1.0:
            raise ValueError(f"dense_feature_fraction must be in [0, 1], got {self.dense_feature_fraction}")
        if self.version != 1:
            raise ValueError(f"unsupported Sparse24Config version {self.version}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Sparse24Config:
        return cls(**json.loads(text))


# ------------------------------------------------------------------------------------------
# Token permutation
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _perm_cached(t: int, device: str, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(t, generator=gen)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(t)
    return perm.to(device), inv.to(device)


def token_permutation(t: int, device: torch.device | str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The fixed permutation of ``t`` tokens and its inverse (cached per size, device, seed)."""
    return _perm_cached(int(t), str(torch.device(device)), int(seed))


def permute_tokens(x: Tensor, perm: Tensor) -> Tensor:
    """``x[perm]`` along the token (first) dim."""
    return x.index_select(0, perm)


def unpermute_tokens(x: Tensor, inv: Tensor) -> Tensor:
    """Inverse of :func:`permute_tokens` given the inverse permutation."""
    return x.index_select(0, inv)


# ------------------------------------------------------------------------------------------
# 2:4 matmul: cuSPARSELt when it applies, dense otherwise
# ------------------------------------------------------------------------------------------


def cslt_supported(a: Tensor, b: Tensor) -> bool:
    """True when ``a @ b`` with a 2:4 ``a`` can run on cuSPARSELt here."""
    if not (a.is_cuda and b.is_cuda and sparse24.available(a.device)):
        return False
    if a.dtype not in (torch.float16, torch.bfloat16) or b.dtype != a.dtype:
        return False
    m, k = a.shape
    n = b.shape[1]
    # multiples of 64 satisfy every cuSPARSELt bf16/fp16 alignment rule with room to spare
    return m % 64 == 0 and k % 64 == 0 and n % 64 == 0


def mm24(a: Tensor, b: Tensor, transpose_result: bool = False) -> Tensor:
    """``a @ b`` (or its transpose) where every group of 4 along ``a``'s rows has <= 2 non-zeros.

    cuSPARSELt when :func:`cslt_supported`, else a dense matmul of the pruned ``a``.
    """
    if cslt_supported(a, b):
        if not (b.is_contiguous() or b.t().is_contiguous()):
            b = b.contiguous()
        # one pass into cuSPARSELt's layout; torch._cslt_compress costs ~30x the bytes' time
        return cslt_mm(compress24(a), a.shape[0], b, transpose_result)
    out = a @ b
    return out.t() if transpose_result else out


# ------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------


@torch.library.custom_op("fxsparse::sparse24_schedule", mutates_args=("step",))
def sparse24_schedule(step: Tensor, dense_warmup_steps: int, advance: bool) -> Tensor:
    """Bool (CPU, 0-d): is this forward sparse? ``step >= warmup``; then ``step += advance``."""
    sparse = bool(step.item() >= dense_warmup_steps)
    if advance:
        step.add_(1)
    return torch.tensor(sparse)


@sparse24_schedule.register_fake
def _(step, dense_warmup_steps, advance):
    return torch.empty((), dtype=torch.bool, device="cpu")


def _check_ffn(x: Tensor, w1: Tensor, w2: Tensor, method: str) -> None:
    torch._check(x.dim() == 2, lambda: f"squared_relu24_ffn: x must be [tokens, hidden], got {x.dim()}-D")
    torch._check(
        w1.dim() == 2 and w2.dim() == 2 and w1.shape[1] == x.shape[1] and w2.shape == w1.shape[::-1],
        lambda: f"squared_relu24_ffn: bad shapes x{tuple(x.shape)} w1{tuple(w1.shape)} w2{tuple(w2.shape)}",
    )
    torch._check(
        w1.shape[0] % 4 == 0,
        lambda: "squared_relu24_ffn: intermediate size must be a multiple of 4",
    )
    torch._check(method in METHODS, lambda: f"squared_relu24_ffn: unknown method {method!r}")


def _soft_scale(v: Tensor, s: Tensor) -> float:
    """``dot(v, s) / dot(s, s)``: the least-squares scale bringing the shrunk values back."""
    num = (v.float() * s.float()).sum()
    den = (s.float() * s.float()).sum()
    return float(num / den) if float(den) > 0 else 1.0


@torch.library.custom_op("fxsparse::squared_relu24_ffn", mutates_args=())
def _ffn_fwd(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    sparse: Tensor,
    soft_scale: Tensor,
    method: str,
    training: bool,
    seed: int,
    dense_feature_fraction: float,
    permute: bool,
    permutation_seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, y1, y2s, counts, scale)``: the FFN output and what its backward needs.

    ``y1 = x W1^T``; ``y2s`` = ReLU(y1)^2, 2:4-pruned (unscaled) when ``sparse``; ``counts`` =
    non-zeros per feature of ``y2s``; ``scale`` = the soft-threshold scale in use (the input
    one, or computed now when it is NaN), 1 for the other methods. ``seed`` < 0 draws the
    MVUE randomness from torch's generator. The last three arguments are for the backward.
    """
    _check_ffn(x, w1, w2, method)
    is_sparse = bool(sparse.item())
    y1 = x @ w1.t()  # [T, i]
    scale = 1.0
    if not is_sparse:
        y2 = torch.relu(y1).square()
        counts = torch.zeros(w1.shape[0], dtype=torch.int32, device=x.device)
        return y2 @ w2.t(), y1, y2, counts, torch.full((), float(soft_scale), dtype=torch.float32)
    m = method if (training or method != "mvue") else "naive"  # eval: deterministic top-2
    y2s, counts = sparsify24(y1, m, relu2=True, count=True, seed=None if seed < 0 else seed)
    if method == "soft_threshold":
        scale = float(soft_scale)
        if math.isnan(scale):  # first sparse step of this layer: compute once (one sync)
            scale = _soft_scale(torch.relu(y1.float()).square(), y2s)
    y = mm24(y2s, w2.t())  # [T, h]
    if scale != 1.0:
        y = y * scale
    return y, y1, y2s, counts, torch.full((), scale, dtype=torch.float32)


@_ffn_fwd.register_fake
def _(x, w1, w2, sparse, soft_scale, method, training, seed, frac, permute, perm_seed):
    _check_ffn(x, w1, w2, method)
    t, i = x.shape[0], w1.shape[0]
    return (
        x.new_empty((t, w2.shape[0])),
        x.new_empty((t, i)),
        x.new_empty((t, i)),
        x.new_empty((i,), dtype=torch.int32),
        torch.empty((), dtype=torch.float32, device="cpu"),
    )


def dense_feature_mask(counts: Tensor, fraction: float) -> Tensor | None:
    """Bool ``[i]``: the ``ceil(fraction * i)`` features with the most non-zeros (kept dense).

    Ties in the count go to the lower feature index.
    """
    n = math.ceil(fraction * counts.numel() - 1e-9)
    if n <= 0:
        return None
    i = counts.numel()
    # unique keys: among equal counts the lower feature index wins, on every device
    key = counts.long() * i + (i - 1 - torch.arange(i, device=counts.device))
    mask = torch.zeros(i, dtype=torch.bool, device=counts.device)
    mask[torch.topk(key, n, sorted=False).indices] = True
    return mask


@torch.library.custom_op("fxsparse::squared_relu24_ffn_backward", mutates_args=())
def _ffn_bwd(
    dy: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    y1: Tensor,
    y2s: Tensor,
    counts: Tensor,
    sparse: Tensor,
    scale: Tensor,
    method: str,
    dense_feature_fraction: float,
    permute: bool,
    permutation_seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw1, dw2)`` of the squared-ReLU FFN, feature-wise 2:4 when ``sparse``."""
    dy = dy.contiguous()
    if not bool(sparse.item()):
        dy2 = dy @ w2  # [T, i]
        dy1 = dy2 * (2 * torch.relu(y1))
        return dy1 @ w1, dy1.t() @ x, dy.t() @ y2s
    s = float(scale)
    if s != 1.0:
        dy = dy * s  # y = s * (y2s W2^T): the fixed scale multiplies every gradient through y
    dy2 = dy @ w2  # [T, i] dense: dy is dense
    # -- forward mask (and MVUE rescale) re-applied: dropped entries get no gradient --
    dy1 = relu2_grad24(dy2, y1, y2s, mvue=method == "mvue").to(x.dtype)
    dx = mm24(dy1, w1)  # exact: dy1 carries the forward 2:4 pattern along features
    t = x.shape[0]
    if t % 4 != 0 or dense_feature_fraction >= 1.0:
        return dx, dy1.t() @ x, dy.t() @ y2s  # no whole token groups: exact dense weight grads
    # -- weight gradients: 2:4 along tokens for the sparse features, dense for the rest --
    dense = dense_feature_mask(counts, dense_feature_fraction)
    perm = token_permutation(t, x.device, permutation_seed)[0] if permute else None
    dyp = dy if perm is None else permute_tokens(dy, perm)
    xp = x if perm is None else permute_tokens(x, perm)
    dw2 = mm24(prune24_tokens_t(y2s, perm, dense), dyp, transpose_result=True)  # [h, i]
    dw1 = mm24(prune24_tokens_t(dy1, perm, dense), xp)  # [i, h]
    if dense is not None:
        idx = dense.nonzero().squeeze(1)
        dw2.index_copy_(1, idx, dy.t() @ y2s.index_select(1, idx))
        dw1.index_copy_(0, idx, dy1.index_select(1, idx).t() @ x)
    return dx.contiguous(), dw1.contiguous(), dw2.contiguous()


@_ffn_bwd.register_fake
def _(dy, x, w1, w2, y1, y2s, counts, sparse, scale, method, frac, permute, seed):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


def _ffn_setup(ctx, inputs, output):
    x, w1, w2, sparse, _, method, _, _, frac, permute, perm_seed = inputs
    _, y1, y2s, counts, scale = output
    ctx.save_for_backward(x, w1, w2, y1, y2s, counts, sparse, scale)
    ctx.options = (method, frac, permute, perm_seed)
    ctx.mark_non_differentiable(y1, y2s, counts, scale)


def _ffn_backward(ctx, dy, *_unused):
    x, w1, w2, y1, y2s, counts, sparse, scale = ctx.saved_tensors
    dx, dw1, dw2 = _ffn_bwd(dy, x, w1, w2, y1, y2s, counts, sparse, scale, *ctx.options)
    return dx, dw1, dw2, None, None, None, None, None, None, None, None


_ffn_fwd.register_autograd(_ffn_backward, setup_context=_ffn_setup)


def squared_relu24_ffn(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    sparse: Tensor | bool,
    method: str = "mvue",
    soft_scale: Tensor | None = None,
    training: bool = True,
    seed: int = -1,
    dense_feature_fraction: float = 0.05,
    permute: bool = True,
    permutation_seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``ReLU(x W1^T)^2 W2^T`` with 2:4 activations when ``sparse``; returns ``(y, scale)``.

    ``x`` is ``[tokens, hidden]``; ``scale`` is the soft-threshold scale used (store it and pass
    it back as ``soft_scale`` so it stays fixed).
    """
    if not isinstance(sparse, Tensor):
        sparse = torch.tensor(bool(sparse))
    if soft_scale is None:
        soft_scale = torch.tensor(float("nan"))
    y, _, _, _, scale = _ffn_fwd(
        x,
        w1,
        w2,
        sparse,
        soft_scale,
        method,
        training,
        seed,
        dense_feature_fraction,
        permute,
        permutation_seed,
    )
    return y, scale


# ------------------------------------------------------------------------------------------
# Module and conversion
# ------------------------------------------------------------------------------------------


class SquaredReLU24MLP(nn.Module):
    """``down(2:4(ReLU(up(x))^2))``: the drop-in replacement of a SwiGLU MLP.

    Buffers (kept on the CPU whatever ``.to()`` says, so reading them never syncs a device):
    ``step`` (training forwards seen; persistent, so a resumed run keeps its schedule) and
    ``soft_scale`` (NaN until the first sparse soft-threshold step). Being CPU tensors, they
    keep CUDA graphs (``mode="reduce-overhead"``) from capturing the compiled step, and DDP
    needs ``broadcast_buffers=False``. The counter advances once per training forward, so
    activation checkpointing (which re-runs forwards) counts those too. Measure the natural
    sparsity with :func:`activation_sparsity` (tracking it here would cost a device sync).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        config: Sparse24Config | None = None,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if intermediate_size % 4:
            raise ValueError(f"intermediate_size must be a multiple of 4, got {intermediate_size}")
        self.config = config or Sparse24Config()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        kw = {"device": device, "dtype": dtype}
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **kw)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("soft_scale", torch.full((), float("nan")))

    def _apply(self, fn, recurse=True):
        # step and soft_scale are host-side state read by the ops; they never leave the CPU
        keep = {k: self._buffers[k] for k in ("step", "soft_scale")}
        super()._apply(fn, recurse)
        for k, v in keep.items():
            self._buffers[k] = v
        return self

    @property
    def sparse_active(self) -> bool:
        """True once the dense warm-up is over."""
        return int(self.step) >= self.config.dense_warmup_steps

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.config
        training = self.training and torch.is_grad_enabled()
        sparse = sparse24_schedule(self.step, cfg.dense_warmup_steps, training)
        x2 = x.reshape(-1, x.shape[-1])  # [T, h]
        w1, w2 = self.up_proj.weight, self.down_proj.weight
        if torch.is_autocast_enabled(x.device.type):  # custom ops are not autocast-aware
            dt = torch.get_autocast_dtype(x.device.type)
            x2, w1, w2 = x2.to(dt), w1.to(dt), w2.to(dt)
        y, scale = squared_relu24_ffn(
            x2,
            w1,
            w2,
            sparse,
            cfg.method,
            self.soft_scale,
            training=self.training,
            dense_feature_fraction=cfg.dense_feature_fraction,
            permute=cfg.permute_tokens,
            permutation_seed=cfg.permutation_seed,
        )
        if cfg.method == "soft_threshold":
            self.soft_scale.copy_(scale)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        if self.down_proj.bias is not None:
            y = y + self.down_proj.bias
        return y

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, {self.config.to_json()}"


_SWIGLU = ("gate_proj", "up_proj", "down_proj")


def _is_swiglu(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in _SWIGLU)


def convert_mlp(
    mlp: nn.Module,
    config: Sparse24Config | None = None,
    intermediate_scale: float = 1.5,
    init_std: float | None = None,
    name: str = "module",
) -> SquaredReLU24MLP:
    """A fresh :class:`SquaredReLU24MLP` with the shape budget of a SwiGLU ``mlp``.

    Raises ``TypeError`` naming the module when it lacks Linear gate_proj/up_proj/down_proj.
    """
    if not _is_swiglu(mlp):
        raise TypeError(
            f"{name} ({type(mlp).__name__}) is not a Llama-family SwiGLU MLP: expected nn.Linear "
            "attributes gate_proj, up_proj and down_proj"
        )
    h = mlp.up_proj.in_features
    i = mlp.up_proj.out_features
    new_i = int(round(i * intermediate_scale / 4)) * 4  # a multiple of 4 for 2:4 groups
    w = mlp.up_proj.weight
    new = SquaredReLU24MLP(
        h, new_i, config, bias=mlp.down_proj.bias is not None, device=w.device, dtype=w.dtype
    )
    # Fresh init (the shapes change, so no weight carries over): normal(0, init_std) like the
    # HF Llama init when a std is given, else nn.Linear's default (kaiming-uniform).
    if init_std is not None:
        with torch.no_grad():
            for lin in (new.up_proj, new.down_proj):
                lin.weight.normal_(0.0, init_std)
                if lin.bias is not None:
                    lin.bias.zero_()
    return new


def convert_to_squared_relu_24(
    model: nn.Module,
    method: str = "mvue",
    dense_warmup_steps: int = 1000,
    dense_feature_fraction: float = 0.05,
    permute_tokens: bool = True,
    permutation_seed: int = 0,
    intermediate_scale: float = 1.5,
    init_std: float | None = None,
) -> nn.Module:
    """Replace every SwiGLU MLP of ``model`` (in place) by a 2:4 squared-ReLU MLP.

    Args:
        model: a HF Llama-family model (modules with gate_proj/up_proj/down_proj, e.g.
            ``LlamaMLP``) or one such MLP's parent. Each MLP *instance* is replaced; no
            transformers class is patched.
        method: forward 2:4 method, ``"naive"``, ``"mvue"`` or ``"soft_threshold"``.
        dense_warmup_steps: training forwards (per layer) run dense before 2:4 starts.
        dense_feature_fraction: share of features kept dense in the backward's token-wise 2:4.
        intermediate_scale: new intermediate size / old; 1.5 keeps the parameter count
            (3*h*i = 2*h*1.5i) when ``i`` is a multiple of 8.
        init_std: std of the fresh normal init; default ``model.config.initializer_range``
            when present, else nn.Linear's default init.

    Returns:
        ``model``, with ``model.fxsparse_sparse24`` set to the :class:`Sparse24Config`.

    Raises:
        TypeError: naming the module, when ``model`` holds no SwiGLU MLP, or when a module
        named ``mlp`` / ``feed_forward`` is not one (e.g. GPT-2's ``c_fc``/``c_proj`` MLP).

    Example::

        model = convert_to_squared_relu_24(LlamaForCausalLM(cfg), method="mvue")
        model = torch.compile(model, backend="sparse_act")
    """
    cfg = Sparse24Config(method, dense_warmup_steps, dense_feature_fraction, permute_tokens, permutation_seed)
    if init_std is None:
        init_std = getattr(getattr(model, "config", None), "initializer_range", None)
    if isinstance(model, SquaredReLU24MLP) or _is_swiglu(model):
        raise TypeError(f"{type(model).__name__} is an MLP itself: pass its parent model, or use convert_mlp")
    targets = []
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if _is_swiglu(mod):
            targets.append(name)
        elif last in ("mlp", "feed_forward", "ffn") and not isinstance(mod, SquaredReLU24MLP):
            raise TypeError(
                f"{name} ({type(mod).__name__}) is not a Llama-family SwiGLU MLP: expected "
                "nn.Linear attributes gate_proj, up_proj and down_proj"
            )
    if not targets:
        raise TypeError(
            f"{type(model).__name__} holds no Llama-family SwiGLU MLP (modules with nn.Linear "
            "gate_proj, up_proj, down_proj); nothing to convert"
        )
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        setattr(parent, attr, convert_mlp(old, cfg, intermediate_scale, init_std, name))
    model.fxsparse_sparse24 = cfg
    return model


@torch.no_grad()
def activation_sparsity(model: nn.Module, *args, **kwargs) -> dict[str, float]:
    """Fraction of exact zeros in ReLU^2 activations per converted MLP, for one forward.

    Measured on the dense activations (before any 2:4), which is the "natural" sparsity.
    """
    stats: dict[str, float] = {}
    hooks = []

    def hook(name):
        def fn(mod, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            y1 = x @ mod.up_proj.weight.t()
            stats[name] = float((y1 <= 0).float().mean())

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, SquaredReLU24MLP):
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    was = model.training
    model.eval()
    try:
        model(*args, **kwargs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return stats
