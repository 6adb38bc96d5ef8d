"""FX passes, one per file. Each is a function ``(gm, ...) -> gm`` with its contract in the docstring.

- ``match``: find linear layers and name them (``node.meta["fxsparse_site"]``)
- ``observe``: insert observer modules before the input of named linears (calibration)
- ``lower``: rewrite planned linears into ``fxsparse::threshold_linear`` (or, when every call has
  more rows than the fused kernel takes, the mask as aten ops + ``linear``, for Inductor to fuse)
- ``group``: fuse sibling ``threshold_linear`` calls on one input into ``threshold_linear_group``
- ``fuse_act``: a one-row ``threshold_linear`` of ``act(a) * b`` computes that input itself
  (``threshold_linear_act``)
- ``accumulate``: one-row sparse layers add into chained float32 outputs their readers round
  (``threshold_linear_acc``)
- ``tap`` (debugging, backend option ``keep_taps``): record the input each sparse site judges
"""

from .accumulate import accumulate_outputs
from .fuse_act import fuse_activations
from .group import group_siblings
from .lower import lower_linears
from .match import LinearSite, linear_sites, match_linears
from .observe import insert_observers
from .tap import tap_inputs

__all__ = ["LinearSite", "accumulate_outputs", "fuse_activations", "group_siblings", "insert_observers",
           "linear_sites", "lower_linears", "match_linears", "tap_inputs"]
