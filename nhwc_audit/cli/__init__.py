"""``nhwc-audit SPEC``: the command line, the only code that prints or exits. ``parser``
(the options), ``run`` (one audit and its optional steps), ``main`` (exit codes, errors)."""

from __future__ import annotations

from .main import main
from .parser import build_parser

__all__ = ["build_parser", "main"]
