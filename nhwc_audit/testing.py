"""Assertions for a model's own test suite: the model stays channels_last, apart from what the
team has accepted.

>>> import torch
>>> from nhwc_audit.testing import assert_channels_last
>>> assert_channels_last(torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 16, 16), bandwidth=1e9)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .api import audit, fail_on_kinds
from .records import FailOn, Finding, FindingKind
from .report.text import offender_line
from .result import AuditReport

__all__ = ["assert_channels_last", "check_report", "checked_arguments"]


def _allowed(f: Finding, allow: tuple[str, ...]) -> bool:
    """``f`` is accepted by a pattern: a finding key (:attr:`Finding.key`, glob patterns allowed;
    a key written with its line, ``...:m.py:36``, as keys were before they left lines out, still
    matches at that line) or a module path pattern (``up*.conv.block.1``, ``decoder.*``)."""
    located = f"{f.key}:{f.source.line}" if f.source is not None else f.key
    return any(
        fnmatch.fnmatchcase(f.key, p) or fnmatch.fnmatchcase(located, p) or fnmatch.fnmatchcase(f.module_path, p)
        for p in allow
    )


def _patterns(allow: Iterable[str] | str) -> tuple[str, ...]:
    """``allow`` as a tuple of patterns: one string is one pattern (not one per character, where a
    lone ``*`` would accept every finding)."""
    if isinstance(allow, str):
        return (allow,)
    patterns = tuple(allow)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"allow takes module path patterns or finding keys (strings), got {bad[0]!r}")
    return patterns


def checked_arguments(allow: Iterable[str] | str, fail_on: FailOn) -> tuple[tuple[str, ...], frozenset[FindingKind]]:
    """``allow`` as patterns and the finding kinds ``fail_on`` counts, or the error a bad value
    gets (checked before an audit runs)."""
    return _patterns(allow), fail_on_kinds(fail_on)


def assert_channels_last(
    model: nn.Module | Callable[[], Any],
    example_inputs: Any = None,
    *,
    allow: Iterable[str] | str = (),
    fail_on: FailOn = "any",
    **options: Any,
) -> None:
    """Raise ``AssertionError`` when auditing ``model`` finds what ``fail_on`` counts ('any':
    every finding; 'revert': breaks, latent breaks, reverts and mixed ops) outside ``allow``
    (module path patterns or finding keys the team has accepted). The message lists each
    offender with module path, op, source line, bytes, hint and its key to allow it.
    ``options`` go to :func:`nhwc_audit.audit`."""
    __tracebackhide__ = True
    checked_arguments(allow, fail_on)  # bad arguments fail before the audit runs
    check_report(audit(model, example_inputs, **options), allow=allow, fail_on=fail_on)


def check_report(report: AuditReport, *, allow: Iterable[str] | str = (), fail_on: FailOn = "any") -> None:
    """:func:`assert_channels_last` on a report already made."""
    __tracebackhide__ = True  # pytest shows the caller's line, not this frame
    accepted, kinds = checked_arguments(allow, fail_on)
    offenders = [f for f in report.offenders(kinds) if not _allowed(f, accepted)]
    if offenders:
        lines = [f"{report.meta.model} does not stay channels_last: {len(offenders)} finding(s) not allowed"]
        lines += [f"  {offender_line(f)}\n    key: {f.key}" for f in offenders]
        raise AssertionError("\n".join(lines))
