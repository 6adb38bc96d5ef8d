"""Record NNCF's activation-sparsity thresholds on the tests' tiny Llama, for
``tests/test_methods.py::test_quantile_ema_reproduces_nncf``.

Needs NNCF (``pip install nncf==3.4.0``; not a dependency of fxsparse). NNCF calibrates with its
sparsifiers switched on, so each layer's batch quantiles are taken on inputs already sparsified
upstream, and averages them over batches with its EMA update (alpha 0.2). Writes
``{"nncf": version, "targets": ..., "thresholds": {layer: tau}}``::

    PYTHONPATH=.:tests python bench/probe/nncf_thresholds.py tests/data/nncf_thresholds_tiny_llama.json
"""

import json
import re
import sys

import nncf
import torch
from nncf.experimental.torch.sparsify_activations import TargetScope, sparsify_activations
from nncf.experimental.torch.sparsify_activations.torch_backend import ActivationsSparsifier

from conftest import tiny_llama, token_batches

TARGETS = {r".*mlp/(up|gate)_proj/linear.*": 0.3, r".*mlp/down_proj/linear.*": 0.5}


def main(out: str) -> None:
    model = tiny_llama()
    data = token_batches(6)
    model = sparsify_activations(model, nncf.Dataset(data, lambda ids: {"input_ids": ids}),
                                 {TargetScope(patterns=[p]): s for p, s in TARGETS.items()})
    taus = {}  # NNCF names a sparsifier after the call: "model/mlp/up_proj/linear/<layer>"
    for name, mod in model.named_modules():
        if isinstance(mod, ActivationsSparsifier):
            m = re.search(r"mlp/(\w+_proj)/linear/(\d+)", name)
            taus[f"model.layers.{m[2]}.mlp.{m[1]}"] = float(mod.running_threshold)
    with open(out, "w") as f:
        json.dump({"nncf": nncf.__version__, "torch": torch.__version__, "targets": TARGETS,
                   "batches": "conftest.token_batches(6)", "thresholds": taus}, f, indent=1)
    print(json.dumps(taus, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
