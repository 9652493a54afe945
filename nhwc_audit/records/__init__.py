"""The data model: frozen records of plain values shared by every pipeline stage.

Nothing here holds a Tensor, an fx Node or a Module, and nothing here imports torch,
networkx or jinja2: the analysis and the reports work from these records alone.
``kinds`` holds the vocabularies (layouts, finding kinds, option values), ``node`` what
propagation records per node, ``audit`` what an audit concludes.
"""

from __future__ import annotations

from .audit import BACKWARD_NOT_AUDITED, AuditMeta, Finding, Fix, Hotspot, Region, Summary, finding_key
from .kinds import (
    ALLOCATING_OPS,
    CONV_OPS,
    FAIL_ON,
    GEMM_OPS,
    BandwidthSource,
    CaptureMethod,
    CaptureName,
    FailOn,
    FindingKind,
    Layout,
    Mode,
    in_place_name,
    op_label,
)
from .node import HiddenCopy, NodeInput, NodeRecord, SourceLoc, TensorMeta

__all__ = [
    "BACKWARD_NOT_AUDITED",
    "ALLOCATING_OPS",
    "CONV_OPS",
    "FAIL_ON",
    "GEMM_OPS",
    "AuditMeta",
    "BandwidthSource",
    "CaptureMethod",
    "CaptureName",
    "FailOn",
    "Finding",
    "FindingKind",
    "Fix",
    "HiddenCopy",
    "Hotspot",
    "Layout",
    "Mode",
    "NodeInput",
    "NodeRecord",
    "Region",
    "SourceLoc",
    "Summary",
    "TensorMeta",
    "finding_key",
    "in_place_name",
    "op_label",
]
