"""The layout strip: one thin bar per op in execution order, coloured by its output layout,
with a mark above each op that has findings (height by bytes): where a network loses and
regains NHWC, readable at a glance for any model size. Consecutive ops of one layout are one
run, so a 3,000-node model draws a few hundred shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..analyze.origin import SKIP_OPS
from ..records import Finding, FindingKind, NodeRecord

__all__ = ["LAYOUT_COLOURS", "layout_strip"]

LAYOUT_COLOURS = {
    "channels_last": "#2e9d5b",
    "contiguous": "#d9534f",
    "ambiguous": "#b0b0b0",
    "strided": "#8e6cc4",
    "not_spatial": "#9cb8d9",
    "break": "#111111",
}
"""Inline colours (the notebook view has no stylesheet); the same as report.css."""

_KIND_COLOURS = {
    FindingKind.REVERT: "#b52020",
    FindingKind.CONVERSION: "#b0308f",
    FindingKind.MIXED: "#c99400",
    FindingKind.BREAK: "#111111",
    FindingKind.LATENT: "#111111",
    FindingKind.BACKWARD: "#1f6fb5",
    FindingKind.DIVERGENCE: "#6a6a6a",
}
_ORDER = list(FindingKind)


def layout_strip(nodes: Sequence[NodeRecord], findings: Sequence[Finding], per: str = "per forward") -> dict[str, Any]:
    """Runs (start, length, layout) and marks (position, height, kind, title) in units of one op;
    ``per``: what the bytes count (the audit's :attr:`~nhwc_audit.records.Summary.per`)."""
    ops = [r for r in nodes if r.op not in SKIP_OPS]
    at = {r.name: i for i, r in enumerate(ops)}
    runs: list[dict[str, Any]] = []
    for i, r in enumerate(ops):
        layout = "break" if r.error else r.output_layout.value
        if runs and runs[-1]["layout"] == layout:
            runs[-1]["length"] += 1
            continue
        runs.append({"start": i, "length": 1, "layout": layout, "colour": LAYOUT_COLOURS[layout], "first": r.name})
    by_node: dict[str, list[Finding]] = {}
    for f in findings:
        if f.node in at:
            by_node.setdefault(f.node, []).append(f)
    top = max((sum(f.bytes for f in fs) for fs in by_node.values()), default=0)
    width = max(1.0, len(ops) / 300)  # a mark stays visible on a few thousand ops
    marks = []
    for name, fs in sorted(by_node.items(), key=lambda kv: at[kv[0]]):
        nbytes = sum(f.bytes for f in fs)
        kind = min((f.kind for f in fs), key=_ORDER.index)
        r = ops[at[name]]
        height = 2 + 8 * (math.log1p(nbytes) / math.log1p(top) if top else 0)
        title = "\n".join(
            [f"{name} ({r.op_label})", r.module_path or "(model)", ", ".join(sorted({f.kind.value for f in fs}))]
            + ([f"{nbytes:,} bytes {per}"] if nbytes else [])
        )
        marks.append(
            {
                "x": at[name],
                "w": width,
                "h": round(height, 2),
                "kind": kind.value,
                "colour": _KIND_COLOURS[kind],
                "node": name,
                "title": title,
            }
        )
    for run in runs:
        run["title"] = f"{run['layout']}: {run['length']} op(s) from {run['first']}"
    return {"n": max(1, len(ops)), "runs": runs, "marks": marks}
