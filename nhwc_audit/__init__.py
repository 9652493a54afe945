"""nhwc-audit: does your PyTorch vision model really stay channels_last (NHWC)?

>>> import torch, nhwc_audit
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.InstanceNorm2d(8))
>>> report = nhwc_audit.audit(m, torch.randn(1, 3, 32, 32), bandwidth=1e9)
>>> [(f.node, f.kind.value, f.op) for f in report.findings]
[('_1', 'revert', 'InstanceNorm2d')]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ChannelsLastError,
    ConversionError,
    NhwcAuditError,
    PropagationError,
    ReportWriteError,
    TargetLoadError,
    TraceError,
    UsageError,
)
from .layout import classify, classify_strides
from .records import Finding, FindingKind, Fix, Hotspot, Layout, NodeRecord, Region, Summary

if TYPE_CHECKING:
    from .api import audit, check, incompatible_nodes, repair
    from .prepare.copy import convert
    from .result import AuditReport
    from .timing.measure import measure

# torch-dependent names load on first use, so `nhwc-audit --help` and `import nhwc_audit`
# stay cheap (no torch, networkx, rich or jinja2 until needed).
_LAZY = {
    "AuditReport": "result",
    "audit": "api",
    "check": "api",
    "incompatible_nodes": "api",
    "convert": "prepare.copy",
    "repair": "api",
    "measure": "timing.measure",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nhwc_audit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "ChannelsLastError",
    "ConversionError",
    "Finding",
    "FindingKind",
    "Fix",
    "Hotspot",
    "Layout",
    "NhwcAuditError",
    "NodeRecord",
    "PropagationError",
    "Region",
    "ReportWriteError",
    "Summary",
    "TargetLoadError",
    "TraceError",
    "UsageError",
    "audit",
    "check",
    "classify",
    "classify_strides",
    "convert",
    "incompatible_nodes",
    "measure",
    "repair",
]
