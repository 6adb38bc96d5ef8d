"""Logging switch in the style of ``TORCH_LOGS``: ``FXSPARSE_LOGS=fxsparse`` (INFO) or
``FXSPARSE_LOGS=+fxsparse`` (DEBUG, adds each graph after each pass), or ``fxsparse.set_logs``.

Logs go to the ``fxsparse`` logger, so an application's own logging setup also works.
"""

from __future__ import annotations

import logging
import os

__all__ = ["set_logs"]

log = logging.getLogger("fxsparse")
_handler: logging.Handler | None = None


def set_logs(level: int | str | None) -> None:
    """``logging.INFO`` / ``"info"``: one line per compiled graph (what was lowered);
    ``logging.DEBUG`` / ``"debug"``: also the graph code after every pass; None: off."""
    global _handler
    if isinstance(level, str):
        level = getattr(logging, level.upper())
    if level is None:
        log.setLevel(logging.NOTSET)
        if _handler is not None:
            log.removeHandler(_handler)
            _handler = None
        return
    log.setLevel(level)
    if _handler is None:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("[fxsparse] %(levelname)s %(message)s"))
        log.addHandler(_handler)


def _from_env() -> None:
    spec = os.environ.get("FXSPARSE_LOGS", "").strip()
    if not spec:
        return
    if spec not in ("fxsparse", "+fxsparse"):
        raise ValueError(f"FXSPARSE_LOGS={spec!r}: use 'fxsparse' (info) or '+fxsparse' (debug)")
    set_logs(logging.DEBUG if spec.startswith("+") else logging.INFO)
