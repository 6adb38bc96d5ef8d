"""fxsparse: activation sparsity for LLM inference as a torch.compile backend.

    plan = fxsparse.calibrate(model, data, {TargetScope(patterns=[r".*mlp\\..*"]): 0.5})
    fast = torch.compile(model, backend="sparse_act", options={"plan": plan})
    print(fxsparse.explain(model, input_ids, plan=plan).table())
"""

from __future__ import annotations

from . import kernels  # noqa: F401  (registers torch.ops.fxsparse.*)
from .backend import sparse_act
from .calibration import calibrate, collect_statistics
from .inspection import Report, explain
from .observers import ActivationObserver
from .plan import LayerPlan, PlanError, SparsityPlan
from .scope import IgnoredScope, ScopeError, TargetScope

__version__ = "0.1.0"

__all__ = [
    "ActivationObserver",
    "IgnoredScope",
    "LayerPlan",
    "PlanError",
    "Report",
    "ScopeError",
    "SparsityPlan",
    "TargetScope",
    "calibrate",
    "collect_statistics",
    "explain",
    "sparse_act",
]


def _register_backend() -> None:
    """Make ``backend="sparse_act"`` work after ``import fxsparse`` too (not only via the entry
    point), and fail loudly if some other library registered a different ``sparse_act``."""
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        register_backend(sparse_act, name="sparse_act")
    except AssertionError:  # torch's message for a duplicate name
        if lookup_backend("sparse_act") is not sparse_act:
            raise RuntimeError("another library registered a torch.compile backend named "
                               "'sparse_act'") from None


_register_backend()
