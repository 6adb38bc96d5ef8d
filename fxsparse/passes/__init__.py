"""FX passes, one per file. Each is a function ``(gm, ...) -> gm`` with its contract in the docstring.

- ``match``: find linear layers and name them (``node.meta["fxsparse_site"]``)
- ``observe``: insert observer modules before the input of named linears (calibration)
- ``lower``: rewrite planned linears into ``fxsparse::threshold_linear``
"""

from .lower import lower_linears
from .match import LinearSite, linear_sites, match_linears
from .observe import insert_observers

__all__ = ["LinearSite", "insert_observers", "linear_sites", "lower_linears", "match_linears"]
