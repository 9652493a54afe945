"""nhwc-audit: does your PyTorch vision model really stay channels_last (NHWC)?

>>> import torch, nhwc_audit
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.InstanceNorm2d(8))
>>> report = nhwc_audit.audit(m, torch.randn(1, 3, 32, 32), bandwidth=1e9)
>>> [(f.node, f.kind.value, f.op) for f in report.findings]
[('_1', 'revert', 'InstanceNorm2d')]
"""

from __future__ import annotations

from .api import AuditReport, audit, check, incompatible_nodes
from .convert import convert
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
from .records import Finding, FindingKind, Hotspot, Layout, NodeRecord, Region, Summary

__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "ChannelsLastError",
    "ConversionError",
    "Finding",
    "FindingKind",
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
]
