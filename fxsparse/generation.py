"""Decoding with Hugging Face ``generate``: the compile config that routes it through sparse_act.

``generate`` compiles the decode step itself when the cache is static, from
``generation_config.compile_config``; torch.compile refuses ``mode=`` next to ``options=``, so the
mode travels inside the options, where the backend reads it.

    model.generate(ids, max_new_tokens=64, cache_implementation="static",
                   compile_config=fxsparse.compile_config(plan))
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .plan import SparsityPlan

__all__ = ["compile_config"]


def compile_config(
    plan: SparsityPlan | str | os.PathLike | Mapping[str, Any],
    mode: str | None = "reduce-overhead",
    *,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    compile_on_cpu: bool = False,
    **options: Any,
):
    """A ``transformers.CompileConfig`` for ``generate`` that compiles with ``sparse_act``.

    ``compile_on_cpu`` lets ``generate`` compile on CPU too (it only does on GPUs by default).
    """
    from transformers import CompileConfig

    opts = {"plan": SparsityPlan.coerce(plan), **options}
    if mode is not None:
        opts["mode"] = mode
    cfg = CompileConfig(fullgraph=fullgraph, dynamic=dynamic, backend="sparse_act", mode=None,
                        options=opts)
    if compile_on_cpu:
        cfg._compile_all_devices = True
    return cfg
