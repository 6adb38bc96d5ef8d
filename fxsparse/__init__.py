"""fxsparse: activation sparsity for LLM inference as a torch.compile backend.

    plan = fxsparse.calibrate(model, data, {TargetScope(patterns=[r".*mlp\\..*"]): 0.5})
    fast = torch.compile(model, backend="sparse_act", options={"plan": plan})
    print(fxsparse.explain(model, input_ids, plan=plan).table())
"""

from __future__ import annotations

from . import kernels  # noqa: F401  (registers torch.ops.fxsparse.*)
from .backend import sparse_act
from .calibration import calibrate, collect_statistics
from .evaluation import EvalResult, evaluate
from .generation import compile_config
from .inspection import Report, explain, keep_agreement
from .logs import _from_env as _logs_from_env
from .logs import set_logs
from .methods import allocate_sparsity, collect_method_statistics, plan_from_observers, refine_plan
from .observers import ActivationObserver
from .plan import LayerPlan, PlanError, SparsityPlan
from .prepare import compile, prepare_weights
from .scope import IgnoredScope, ScopeError, TargetScope
from .speed import compare_decode  # decode speed (fxsparse bench); also fxsparse.speed.*
from .training import Sparse24Config, SquaredReLU24MLP, convert_to_squared_relu_24

__version__ = "0.1.0"


__all__ = [
    "allocate_sparsity",
    "collect_method_statistics",
    "plan_from_observers",
    "refine_plan",
    "ActivationObserver",
    "EvalResult",
    "IgnoredScope",
    "LayerPlan",
    "PlanError",
    "Report",
    "ScopeError",
    "Sparse24Config",
    "SparsityPlan",
    "SquaredReLU24MLP",
    "TargetScope",
    "calibrate",
    "compile",
    "compile_config",
    "convert_to_squared_relu_24",
    "evaluate",
    "collect_statistics",
    "explain",
    "keep_agreement",
    "prepare_weights",
    "set_logs",
    "sparse_act",
    "compare_decode",
]


def _register_backend() -> None:
    """Make ``backend="sparse_act"`` work after ``import fxsparse`` when the package is not
    installed (PYTHONPATH use). When it is, torch registers it from the entry point on first
    lookup (loading this very module), and registering here too would be a duplicate."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if any(ep.name == "sparse_act" for ep in entry_points(group="torch_dynamo_backends")):
        return
    if "sparse_act" in _COMPILER_FNS and _COMPILER_FNS["sparse_act"] is not sparse_act:
        raise RuntimeError("another library registered a torch.compile backend named 'sparse_act'")
    if "sparse_act" not in _COMPILER_FNS:
        register_backend(sparse_act, name="sparse_act")


_register_backend()
_logs_from_env()
