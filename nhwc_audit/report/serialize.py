"""JSON form of an audit (schema ``nhwc-audit/1``): stable key order, plain values.

Everything except the ``timing`` block is deterministic for a given model, sample and
bandwidth (pass ``bandwidth=`` / ``--bandwidth`` to fix the latter).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from ..records import (
    AuditMeta,
    Finding,
    Fix,
    Hotspot,
    NodeRecord,
    Region,
    SourceLoc,
    Summary,
    TensorMeta,
)

if TYPE_CHECKING:
    from ..analyze.verdict import Verdict
    from ..fix.repair import RepairLog
    from ..fix.results import Deviation
    from ..timing.measure import Measurement

__all__ = ["SCHEMA", "json_text", "extras_dict", "measurement_dict", "repair_dict", "report_dict", "verdict_dict"]

SCHEMA = "nhwc-audit/1"


def _source(s: SourceLoc | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {"file": s.file, "line": s.line, "function": s.function, "code": s.code}


def _tensor(t: TensorMeta) -> dict[str, Any]:
    return {
        "shape": list(t.shape),
        "strides": list(t.strides),
        "dtype": t.dtype,
        "layout": t.layout.value,
        "bytes": t.nbytes,
    }


def _node(r: NodeRecord) -> dict[str, Any]:
    return {
        "index": r.index,
        "name": r.name,
        "op": r.op,
        "target": r.target,
        "op_name": r.op_name,
        "detail": r.detail,
        "module_path": r.module_path,
        "module_type": r.module_type,
        "source": _source(r.source),
        "inputs": [{"producer": i.producer, "is_param": i.is_param, **_tensor(i.meta)} for i in r.inputs],
        "input_layouts": [i.meta.layout.value for i in r.inputs if not i.is_param],
        "output_layouts": [o.layout.value for o in r.outputs],
        "output_shapes": [list(o.shape) for o in r.outputs],
        "output_strides": [list(o.strides) for o in r.outputs],
        "dtype": r.outputs[0].dtype if r.outputs else None,
        "bytes": r.output_bytes,
        "aliases_input": r.aliases_input,
        "in_place": r.in_place,
        "users": list(r.users),
        "error": r.error,
        "latent_error": r.latent_error,
        "grad_layouts": [g.layout.value for g in r.grads],
    }


def _finding(f: Finding) -> dict[str, Any]:
    return {
        "node": f.node,
        "kind": f.kind.value,
        "op": f.op,
        "target": f.target,
        "module_path": f.module_path,
        "module_type": f.module_type,
        "source": _source(f.source),
        "layout_in": f.layout_in.value,
        "layout_out": f.layout_out.value,
        "shape": list(f.shape),
        "detail": f.detail,
        "bytes": f.bytes,
        "est_seconds": f.est_seconds,
        "hint": f.hint,
        "producer": f.producer,
        "origin": f.origin,
        "origin_op": f.origin_op,
        "error": f.error,
        "intrinsic": f.intrinsic,
        "recomputed": f.recomputed,
    }


def _hotspot(h: Hotspot) -> dict[str, Any]:
    f = h.finding
    return {
        "rank": h.rank,
        "node": f.node,
        "kind": f.kind.value,
        "op": f.op,
        "module_path": f.module_path,
        "module_type": f.module_type,
        "source": str(f.source) if f.source else None,
        "shape": list(f.shape),
        "bytes": f.bytes,
        "est_seconds": f.est_seconds,
        "share": round(h.share, 6),
        "hint": f.hint,
    }


def _fix(x: Fix) -> dict[str, Any]:
    return {
        "kind": x.kind.value,
        "op": x.op,
        "source": _source(x.source),
        "roots": list(x.roots),
        "findings": x.findings,
        "bytes": x.bytes,
        "hint": x.hint,
    }


def _region(g: Region) -> dict[str, Any]:
    return {
        "id": g.id,
        "nodes": list(g.nodes),
        "entries": list(g.entries),
        "exits": list(g.exits),
        "bytes": g.bytes,
    }


def _summary(s: Summary) -> dict[str, Any]:
    return {
        "nodes": s.nodes,
        "spatial_nodes": s.spatial_nodes,
        "nchw_nodes": s.nchw_nodes,
        "channels_last_node_share": round(s.channels_last_node_share, 6),
        "channels_last_byte_share": round(s.channels_last_byte_share, 6),
        "findings": s.findings,
        "reverts": s.reverts,
        "conversions": s.conversions,
        "mixed": s.mixed,
        "breaks": s.breaks,
        "latent_breaks": s.latent_breaks,
        "backward": s.backward,
        "divergences": s.divergences,
        "bytes_moved": s.bytes_moved,
        "intrinsic": s.intrinsic,
        "intrinsic_bytes": s.intrinsic_bytes,
        "est_seconds": s.est_seconds,
    }


def report_dict(
    meta: AuditMeta,
    nodes: tuple[NodeRecord, ...],
    findings: tuple[Finding, ...],
    fixes: tuple[Fix, ...],
    hotspots: tuple[Hotspot, ...],
    regions: tuple[Region, ...],
    summary: Summary,
    timing: dict[str, float],
) -> dict[str, Any]:
    """The whole report as a dict in the documented key order."""
    return {
        "schema": SCHEMA,
        "model": meta.model,
        "torch_version": meta.torch_version,
        "capture": meta.capture,
        "capture_notes": list(meta.capture_notes),
        "mode": meta.mode,
        "device": meta.device,
        "threads": meta.threads,
        "dtype": meta.dtype,
        "autocast": meta.autocast,
        "training": meta.training,
        "inputs": [_tensor(t) for t in meta.inputs],
        "keyword_inputs": [{"name": k, **_tensor(t)} for k, t in meta.keyword_inputs],
        "bandwidth": {"bytes_per_second": meta.bandwidth, "source": meta.bandwidth_source},
        "summary": _summary(summary),
        "findings": [_finding(f) for f in findings],
        "fixes": [_fix(x) for x in fixes],
        "hotspots": [_hotspot(h) for h in hotspots],
        "regions": [_region(g) for g in regions],
        "modules": [{"path": path, "type": kind} for path, kind in meta.modules],
        "nodes": [_node(r) for r in nodes],
        "timing": {k: round(v, 6) for k, v in timing.items()},
    }


def verdict_dict(verdict: Verdict | None) -> dict[str, Any] | None:
    if verdict is None:
        return None
    return {
        "convert": verdict.convert,
        "summary": verdict.summary,
        "measured": verdict.measured,
        "reasons": list(verdict.reasons),
    }


def repair_dict(repair: RepairLog | None) -> dict[str, Any] | None:
    if repair is None:
        return None
    return {
        "bytes_before": repair.bytes_before,
        "bytes_after": repair.bytes_after,
        "per": repair.per,
        "unchanged": repair.unchanged,
        "steps_per": repair.steps_per,
        "breaks_before": repair.breaks_before,
        "breaks_after": repair.breaks_after,
        "steps": [
            {
                "node": s.node,
                "kind": s.kind,
                "reason": s.reason,
                "bytes_saved": s.bytes_saved,
                "breaks_removed": s.breaks_removed,
            }
            for s in repair.steps
        ],
        "refused": list(repair.refused),
        "notes": list(repair.notes),
        "deviation": _deviation(repair.deviation),
        "naive_deviation": _deviation(repair.naive_deviation),
        "exactness": None
        if repair.exactness is None
        else {
            **{k: _deviation(getattr(repair.exactness, k)) for k in ("original", "conversion", "float64")},
            "agrees": repair.exactness.agrees,
        },
    }


def _deviation(d: Deviation | None) -> dict[str, Any] | None:
    """JSON has no infinities: a deviation that is not finite is null."""

    def finite(v: float | None) -> float | None:
        return v if v is not None and math.isfinite(v) else None

    return None if d is None else {"outputs": finite(d.outputs), "gradients": finite(d.gradients), "dtype": d.dtype}


def measurement_dict(measurement: Measurement | None) -> dict[str, Any] | None:
    if measurement is None:
        return None
    return {
        "train": measurement.train,
        "device": measurement.device,
        "timings": [
            {
                "variant": t.variant,
                "median_s": t.median,
                "min_s": t.low,
                "max_s": t.high,
                "rounds": t.rounds,
                "round_s": list(t.samples),
            }
            for t in measurement.timings
        ],
        "copies": [{"node": n, "seconds": sec} for n, sec in measurement.copies],
        "untimed": [{"variant": v, "reason": why} for v, why in measurement.untimed],
    }


def extras_dict(
    d: dict[str, Any], verdict: Verdict | None, repair: RepairLog | None, measurement: Measurement | None
) -> dict[str, Any]:
    """Add the ``verdict``, ``repair`` and ``measurement`` blocks (before ``timing``, which
    stays last: measurement times are excluded from determinism like ``timing``)."""
    timing = d.pop("timing")
    d["verdict"] = verdict_dict(verdict)
    d["repair"] = repair_dict(repair)
    d["measurement"] = measurement_dict(measurement)
    d["timing"] = timing
    return d


def json_text(value: Any, *, indent: int = 2, expand: int = 2) -> str:
    """``value`` as JSON text a person can read and diff: objects and lists down to depth
    ``expand`` one item per line (indented by ``indent`` spaces a level), anything deeper on
    one line (one node record, finding or module per line). The same value as
    ``json.dumps(value, indent=indent)``, 2-3x faster on a 4 MB report (json's ``indent``
    uses its pure-Python encoder)."""
    return _expanded(value, " " * indent, expand, 1)


def _key(k: Any) -> str:
    # json's own key conversion: strings as they are, True -> "true", 1.5 -> "1.5", ...
    return json.dumps(k if isinstance(k, str) else json.dumps(k), ensure_ascii=False)


def _expanded(value: Any, pad: str, expand: int, depth: int) -> str:
    if depth > expand or not isinstance(value, (dict, list, tuple)) or not value:
        return json.dumps(value, ensure_ascii=False)
    inner, outer = "\n" + pad * depth, "\n" + pad * (depth - 1)
    if isinstance(value, dict):
        items = [f"{_key(k)}: {_expanded(v, pad, expand, depth + 1)}" for k, v in value.items()]
    else:
        items = [_expanded(v, pad, expand, depth + 1) for v in value]
    return (
        ("{" if isinstance(value, dict) else "[")
        + inner
        + ("," + inner).join(items)
        + outer
        + ("}" if isinstance(value, dict) else "]")
    )
