"""HTML report: a view model of plain values built from an AuditReport, rendered with
jinja2 (package templates, autoescape on, strict undefined) into one self-contained file:
CSS and JS inlined (the graph's layout library too), no external URL of any kind.

Imports no torch; the graph is drawn in the browser from :func:`~.modules.graph_data`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from ..collector import collector_paused
from ..records import Finding, FindingKind, Layout
from .files import write_text_atomic
from .modules import finding_kinds, graph_data, module_rows
from .serialize import measurement_dict, repair_dict, verdict_dict
from .strip import LAYOUT_COLOURS, layout_strip
from .text import (
    cost_line,
    count_parts,
    deviation_line,
    evidence_line,
    fake_note,
    fmt_bytes,
    fmt_seconds,
    fmt_share,
    noun,
    run_description,
    sentence,
    share_line,
    short_source,
    untimed_lines,
)

if TYPE_CHECKING:
    import jinja2

    from ..result import AuditReport

__all__ = ["jinja_environment", "render_html", "render_notebook", "view_model", "write_html"]

_KIND_ORDER = {kind: i for i, kind in enumerate(FindingKind)}
"""Severity: the order FindingKind declares its members in."""


def _script_json(value: Any) -> str:
    """JSON to sit inside a ``<script type="application/json">``: ``<``, ``>`` and ``&`` escaped,
    so no user string (a module named ``</script>``) can end the element."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def jinja_environment() -> jinja2.Environment:
    """The package's templates: autoescape on, undefined names an error, the unit filters."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("nhwc_audit.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["bytes"] = fmt_bytes
    env.filters["seconds"] = fmt_seconds
    env.filters["share"] = fmt_share
    env.filters["noun"] = noun
    return env


def _finding_row(f: Finding, share: float | None = None) -> dict[str, Any]:
    return {
        "node": f.node,
        "kind": f.kind.value,
        "kind_label": f.kind_label,
        "op": f.op_label,
        "module_path": f.module_path,
        "module_type": f.module_type,
        "module": f.module_label,
        "source": short_source(f.source),
        "code": f.source.code if f.source else "",
        "shape": "x".join(map(str, f.shape)),
        "layout_in": f.layout_in.value,
        "layout_out": f.layout_out.value,
        "bytes": f.bytes,
        "est_seconds": f.est_seconds,
        "share": share,
        "hint": f.hint,
        "error": f.error or "",
        "origin": f.origin or "",
    }


def view_model(report: AuditReport, *, now: Callable[[], dt.datetime] | None = None) -> dict[str, Any]:
    """Everything the template shows, as plain values (strings, numbers, lists, dicts)."""
    m, s = report.meta, report.summary
    kinds_by_node = finding_kinds(report.findings)
    nodes: list[dict[str, Any]] = []
    for r in report.nodes:
        nodes.append(
            {
                "name": r.name,
                "index": r.index,
                "op_name": r.op_label,
                "module_path": r.module_path,
                "module_type": r.module_type,
                "source": short_source(r.source),
                "code": r.source.code if r.source else "",
                "layout": r.output_layout.value,
                "in_layouts": ", ".join(i.meta.layout.value for i in r.activation_inputs if i.meta.is_spatial),
                "shape": ", ".join(o.shape_str for o in r.outputs),
                "strides": "; ".join(",".join(map(str, o.strides)) for o in r.outputs),
                "dtype": r.outputs[0].dtype if r.outputs else "",
                "bytes": r.output_bytes,
                "kinds": kinds_by_node.get(r.name, []),
            }
        )
    by_name = {n["name"]: n for n in nodes}
    rows = module_rows(report.nodes, report.findings, report.regions, m.modules, m.model)
    graph = graph_data(report.nodes, report.findings, report.regions, rows, per=report.summary.per)
    parents = {row.parent for row in rows}
    top = list(report.hotspots[:25])
    max_bytes = max((h.finding.bytes for h in top), default=1) or 1
    bars = [
        {
            "rank": h.rank,
            "label": f"{h.finding.module_path or h.finding.node} ({h.finding.op})",
            "kind": h.finding.kind.value,
            "bytes": h.finding.bytes,
            "width": round(400 * h.finding.bytes / max_bytes, 1),
            "y": 4 + i * 20,
        }
        for i, h in enumerate(top)
    ]
    regions = [
        {
            "id": g.id,
            "nodes": list(g.nodes),
            "entries": [
                {"name": n, "op": by_name[n]["op_name"], "module": by_name[n]["module_path"]} for n in g.entries
            ],
            "exits": [{"name": n, "op": by_name[n]["op_name"], "module": by_name[n]["module_path"]} for n in g.exits],
            "bytes": g.bytes,
        }
        for g in report.regions
    ]
    measured = measurement_dict(report.measurement)
    created = (now or (lambda: dt.datetime.now(dt.timezone.utc)))()
    return {
        "title": f"nhwc-audit: {m.model}",
        "meta": {
            "model": m.model,
            "torch_version": m.torch_version,
            "capture": m.capture,
            "mode": m.mode,
            "device": m.device,
            "dtype": m.dtype + (f" (autocast {m.autocast})" if m.autocast else ""),
            "training": m.training,
            "inputs": [f"{t.shape_str} ({t.layout.value})" for t in m.inputs]
            + [f"{k}={t.shape_str} ({t.layout.value})" for k, t in m.keyword_inputs],
            "bandwidth": m.bandwidth,
            "bandwidth_source": m.bandwidth_source,
            "backward": m.backward,
            "created": created.strftime("%Y-%m-%d %H:%M UTC"),
        },
        "summary": {
            "nodes": s.nodes,
            "spatial_nodes": s.spatial_nodes,
            "nchw_nodes": s.nchw_nodes,
            "node_share": s.channels_last_node_share,
            "byte_share": s.channels_last_byte_share,
            "reverts": s.reverts,
            "conversions": s.conversions,
            "mixed": s.mixed,
            "breaks": s.breaks,
            "latent_breaks": s.latent_breaks,
            "backward": s.backward,
            "divergences": s.divergences,
            "intrinsic": s.intrinsic,
            "intrinsic_bytes": s.intrinsic_bytes,
            "findings": s.findings,
            "bytes_moved": s.bytes_moved,
            "per": s.per,
            "est_seconds": s.est_seconds,
        },
        "clean": s.findings == 0,
        "text": {
            "run": run_description(m),
            "counts": ", ".join(text for text, _ in count_parts(m, s)),
            "cost": cost_line(m, s),
            "share": sentence(share_line(s)),
            "fake": fake_note(m),
            "evidence": evidence_line(m),
            "notes": list(m.capture_notes),
            "measured": m.mode != "fake",
        },
        "nothing_to_audit": report.nothing_to_audit,
        "hotspots": [_finding_row(h.finding, h.share) | {"rank": h.rank} for h in report.hotspots],
        "breaks": [_finding_row(f) for f in report.findings if f.kind is FindingKind.BREAK],
        "findings": [_finding_row(f) for f in sorted(report.findings, key=lambda f: (f.index, _KIND_ORDER[f.kind]))],
        "fixes": [
            {
                "kind": x.kind.value,
                "op": x.op,
                "source": short_source(x.source),
                "roots": list(x.roots),
                "findings": x.findings,
                "bytes": x.bytes,
                "hint": x.hint,
            }
            for x in report.fixes
        ],
        "bars": bars,
        "chart_height": 8 + 20 * len(bars),
        "regions": regions,
        "nodes": nodes,
        "graph": {
            "ops": len(graph["nodes"]),
            "modules": len(rows),
            "json": Markup(_script_json(graph)),  # escaped for the script element
        },
        "tree": [
            {
                "path": row.path,
                "name": row.name,
                "type": row.type,
                "depth": row.depth,
                "has_children": row.path in parents,
                "ops": row.ops,
                "output_shape": row.output_shape,
                "output_layout": row.output_layout,
                "share": row.share,
                "findings": list(row.findings),
                "moved": row.moved,
            }
            for row in rows
        ],
        "layouts": [lay.value for lay in Layout],
        "strip": layout_strip(report.nodes, report.findings, report.summary.per),
        "strip_colours": LAYOUT_COLOURS,
        "verdict": verdict_dict(report.verdict),
        "repair": repair_dict(report.repair),
        "repair_numerics": deviation_line(report.repair) if report.repair is not None else None,
        "timings": [
            {**t, "speedup": report.measurement.speedup(t["variant"])} for t in (measured or {"timings": []})["timings"]
        ]
        if report.measurement is not None
        else [],
        "copies": []
        if report.measurement is None
        else [{"node": n, "seconds": s} for n, s in report.measurement.copies],
        "untimed": [] if report.measurement is None else untimed_lines(report.measurement, report.findings),
        "timed": "" if report.measurement is None else ("forward+backward" if report.measurement.train else "forward"),
    }


def render_html(report: AuditReport, *, now: Callable[[], dt.datetime] | None = None) -> str:
    """The full self-contained HTML report (the collector paused: :mod:`nhwc_audit.collector`)."""
    with collector_paused():
        return str(jinja_environment().get_template("report.html").render(vm=view_model(report, now=now)))


def render_notebook(report: AuditReport, *, top: int = 10) -> str:
    """Compact HTML for a notebook cell: verdict, the layout strip, fixes, top hotspots, and the
    full interactive report inline behind a control (a sandboxed ``iframe srcdoc``: self-contained,
    no server, its script kept away from the notebook's page)."""
    with collector_paused():
        env = jinja_environment()
        vm = view_model(report)  # one view model for both (it costs ~0.1 s on a 3,000-node graph)
        full = str(env.get_template("report.html").render(vm=vm))
        cell = {**vm, "hotspots": vm["hotspots"][:top]}
        return str(
            env.get_template("notebook.html").render(vm=cell, more=max(0, len(report.hotspots) - top), full=full)
        )


def write_html(report: AuditReport, path: str | os.PathLike[str]) -> Path:
    """Render and write the HTML report atomically."""
    return write_text_atomic(Path(path), render_html(report))
