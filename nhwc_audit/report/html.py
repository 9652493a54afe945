"""HTML report: a view model of plain values built from an AuditReport, rendered with
jinja2 (package templates, autoescape on, strict undefined) into one self-contained file:
CSS and JS inlined, graph and chart as inline SVG, no external URL of any kind.

Imports no torch; the graph layout uses networkx (layers by topological generation).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx

from ..records import Finding, FindingKind, Layout, NodeRecord
from .files import write_text_atomic
from .serialize import measurement_dict, repair_dict, verdict_dict
from .strip import LAYOUT_COLOURS, layout_strip
from .text import (
    cost_line,
    count_parts,
    evidence_line,
    fake_note,
    fmt_bytes,
    fmt_seconds,
    fmt_share,
    run_description,
    sentence,
    share_line,
    short_source,
    untimed_lines,
)

if TYPE_CHECKING:
    import jinja2

    from ..result import AuditReport

__all__ = ["graph_layout", "jinja_environment", "render_html", "render_notebook", "view_model", "write_html"]

_X_STEP, _Y_STEP, _NODE_W, _NODE_H = 34, 22, 26, 14
_KIND_ORDER = {kind: i for i, kind in enumerate(FindingKind)}
"""Severity: the order FindingKind declares its members in."""


def graph_layout(nodes: tuple[NodeRecord, ...]) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str]]]:
    """Grid positions (column = topological generation, row = order within it) and edges."""
    g: nx.DiGraph[str] = nx.DiGraph()
    index = {r.name: r.index for r in nodes}
    for r in nodes:
        g.add_node(r.name)
    edges: list[tuple[str, str]] = []
    for r in nodes:
        for u in r.users:
            if u in index:
                g.add_edge(r.name, u)
                edges.append((r.name, u))
    pos: dict[str, tuple[int, int]] = {}
    for col, layer in enumerate(nx.topological_generations(g)):
        for row, name in enumerate(sorted(layer, key=index.__getitem__)):
            pos[name] = (col, row)
    return pos, edges


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
    return env


def _finding_row(f: Finding, share: float | None = None) -> dict[str, Any]:
    return {
        "node": f.node,
        "kind": f.kind.value,
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
    kinds_by_node: dict[str, list[str]] = {}
    for f in report.findings:
        kinds_by_node.setdefault(f.node, []).append(f.kind.value)
    pos, edges = graph_layout(report.nodes)
    conversion_nodes = {f.node for f in report.findings if f.kind in (FindingKind.CONVERSION, FindingKind.MIXED)}
    nodes: list[dict[str, Any]] = []
    for r in report.nodes:
        col, row = pos.get(r.name, (0, 0))
        kinds = kinds_by_node.get(r.name, [])
        nodes.append(
            {
                "name": r.name,
                "index": r.index,
                "op": r.op,
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
                "kinds": kinds,
                "x": 10 + col * _X_STEP,
                "y": 10 + row * _Y_STEP,
            }
        )
    by_name = {n["name"]: n for n in nodes}
    svg_edges = []
    for a, b in edges:
        na, nb = by_name[a], by_name[b]
        svg_edges.append(
            {
                "x1": na["x"] + _NODE_W,
                "y1": na["y"] + _NODE_H // 2,
                "x2": nb["x"],
                "y2": nb["y"] + _NODE_H // 2,
                "heavy": b in conversion_nodes or (a in kinds_by_node and "revert" in kinds_by_node[a]),
            }
        )
    width = max((n["x"] for n in nodes), default=0) + _NODE_W + 20
    height = max((n["y"] for n in nodes), default=0) + _NODE_H + 20
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
            "inputs": [f"{t.shape_str} ({t.layout.value})" for t in m.inputs],
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
            "findings": s.findings,
            "bytes_moved": s.bytes_moved,
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
        "graph": {
            "nodes": nodes,
            "edges": svg_edges,
            "width": width,
            "height": height,
            "w": _NODE_W,
            "h": _NODE_H,
            "box_height": max(160, min(520, height * 2)),
        },
        "layouts": [lay.value for lay in Layout],
        "strip": layout_strip(report.nodes, report.findings),
        "strip_colours": LAYOUT_COLOURS,
        "verdict": verdict_dict(report.verdict),
        "repair": repair_dict(report.repair),
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
    """The full self-contained HTML report."""
    return str(jinja_environment().get_template("report.html").render(vm=view_model(report, now=now)))


def render_notebook(report: AuditReport, *, top: int = 10) -> str:
    """Compact HTML for a notebook cell: verdict, the layout strip, fixes, top hotspots, and the
    full interactive report inline behind a control (a sandboxed ``iframe srcdoc``: self-contained,
    no server, its script kept away from the notebook's page)."""
    vm = view_model(report)
    vm["hotspots"] = vm["hotspots"][:top]
    template = jinja_environment().get_template("notebook.html")
    return str(template.render(vm=vm, more=max(0, len(report.hotspots) - top), full=render_html(report)))


def write_html(report: AuditReport, path: str | os.PathLike[str]) -> Path:
    """Render and write the HTML report atomically."""
    return write_text_atomic(Path(path), render_html(report))
