"""Terminal summary, built with rich (tables, colour only on a terminal, NO_COLOR honoured).

``render_summary`` returns a renderable; only the CLI prints it.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..api import AuditReport
from ..records import FindingKind, SourceLoc
from .text import fmt_bytes, fmt_seconds, fmt_share, short_path

__all__ = ["render_summary", "short_source"]

_KIND_STYLE = {
    FindingKind.BREAK: "bold red",
    FindingKind.REVERT: "red",
    FindingKind.MIXED: "yellow",
    FindingKind.CONVERSION: "magenta",
    FindingKind.BACKWARD: "blue",
    FindingKind.DIVERGENCE: "dim",
}


def short_source(s: SourceLoc | None, cwd: str | None = None) -> str:
    """``file:line`` with the file relative to the working directory, or to site-packages."""
    return f"{short_path(s.file, cwd)}:{s.line}" if s else ""


def render_summary(report: AuditReport, *, top: int = 10, paths: tuple[Path, ...] = ()) -> RenderableType:
    """Verdict line, counts, the top hotspots and the report paths."""
    m, s = report.meta, report.summary
    shapes = ", ".join(t.shape_str for t in m.inputs) or "none"
    head = Text.assemble(
        (m.model, "bold"),
        f" ({m.capture}, {m.mode} {m.device}, {m.dtype}{' autocast ' + m.autocast if m.autocast else ''}, {'train' if m.training else 'eval'} mode, "
        f"input {shapes}, torch {m.torch_version})",
    )
    counts = Text.assemble(
        f"{s.nodes} nodes: ",
        (f"{s.reverts} reverts", _KIND_STYLE[FindingKind.REVERT] if s.reverts else ""),
        ", ",
        (f"{s.conversions} conversions", _KIND_STYLE[FindingKind.CONVERSION] if s.conversions else ""),
        ", ",
        (f"{s.mixed} mixed", _KIND_STYLE[FindingKind.MIXED] if s.mixed else ""),
        ", ",
        (f"{s.breaks} breaks", _KIND_STYLE[FindingKind.BREAK] if s.breaks else ""),
        f", {s.backward} backward"
        if m.capture_notes and any(n.startswith("backward:") for n in m.capture_notes)
        else "",
        f"; {fmt_bytes(s.bytes_moved)} moved by layout changes per forward "
        f"(~{fmt_seconds(s.est_seconds)} at {fmt_bytes(m.bandwidth)}/s, {m.bandwidth_source})",
    )
    if report.nothing_to_audit:
        verdict = Text("no 4D/5D activations: nothing to audit for channels_last")
    elif s.findings == 0:
        verdict = Text("stays channels_last: no reverts, conversions, mixed ops or breaks", style="green")
    else:
        verdict = Text(
            f"{fmt_share(s.channels_last_node_share)} of spatial nodes and "
            f"{fmt_share(s.channels_last_byte_share)} of activation bytes stay channels_last"
        )
    parts: list[RenderableType] = [head, counts, verdict]
    if m.mode == "fake":
        parts.append(
            Text(f"fake mode: every layout is a prediction for {m.device} (no weights, no compute)", style="yellow")
        )
    for note in m.capture_notes:
        parts.append(Text(f"note: {note}", style="dim"))
    shown = report.hotspots[:top]
    if shown:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=None)
        for col, just in (
            ("#", "right"),
            ("kind", "left"),
            ("node", "left"),
            ("module", "left"),
            ("op", "left"),
            ("shape", "left"),
            ("source", "left"),
            ("bytes", "right"),
            ("share", "right"),
        ):
            table.add_column(col, justify=just, no_wrap=col != "module")  # type: ignore[arg-type]
        for h in shown:
            f = h.finding
            table.add_row(
                str(h.rank),
                Text(f.kind.value, _KIND_STYLE[f.kind]),
                f.node,
                _module(f.module_path, f.module_type),
                _op(f.op, f.detail),
                "x".join(map(str, f.shape)),
                short_source(f.source),
                fmt_bytes(f.bytes),
                fmt_share(h.share),
            )
        parts.append(table)
        if len(report.hotspots) > top:
            parts.append(Text(f"... and {len(report.hotspots) - top} more hotspots in the report"))
    if report.fixes:
        parts.append(Text("What to change:", style="bold"))
        for i, fx in enumerate(report.fixes, 1):
            nodes = ", ".join(fx.roots[:3]) + (f" +{len(fx.roots) - 3}" if len(fx.roots) > 3 else "")
            cost = f"{fmt_bytes(fx.bytes)}, " if fx.bytes else ""
            at = f" at {short_source(fx.source)}" if fx.source else ""
            parts.append(
                Text.assemble(
                    f" {i}. ",
                    (f"{fx.op}", "bold"),
                    f"{at}: {fx.kind.value} x{len(fx.roots)} ",
                    f"({cost}{fx.findings} finding{'s' if fx.findings != 1 else ''}; {nodes}): ",
                    fx.hint,
                )
            )
    if report.repair is not None:
        rp = report.repair
        parts.append(Text("Repair:", style="bold"))
        parts.append(
            Text(
                f" layout changes {fmt_bytes(rp.bytes_before)} -> {fmt_bytes(rp.bytes_after)} per forward, "
                f"breaks {rp.breaks_before} -> {rp.breaks_after}"
                + ("" if rp.steps else " (nothing to repair: no rewrite removes bytes without changing the math)")
            )
        )
        for st in rp.steps:
            parts.append(Text(f"  {st.kind:<24} {st.node}: {st.reason} (-{fmt_bytes(st.bytes_saved)})"))
        for msg in rp.refused:
            parts.append(Text(f"  refused: {msg}", style="yellow"))
    if report.measurement is not None:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=None)
        for col in ("variant", "median", "min", "max", "vs NCHW"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for t in report.measurement.timings:
            sp = report.measurement.speedup(t.variant)
            table.add_row(
                t.variant, fmt_seconds(t.median), fmt_seconds(t.low), fmt_seconds(t.high), f"{sp:.2f}x" if sp else "-"
            )
        parts.append(
            Text(
                f"Measured {'forward+backward' if report.measurement.train else 'forward'} on {report.measurement.device}:",
                style="bold",
            )
        )
        parts.append(table)
        if report.measurement.copies:
            costly = ", ".join(f"{n} {fmt_seconds(sec)}" for n, sec in report.measurement.copies[:5])
            parts.append(Text(f"Measured copy kernels by node (profiler, channels_last graph): {costly}"))
    if report.verdict is not None:
        v = report.verdict
        parts.append(
            Text.assemble(
                ("Verdict: ", "bold"), (v.summary, "green" if v.convert else "red"), " — " + "; ".join(v.reasons)
            )
        )
    for p in paths:
        parts.append(Text(f"{'repaired code' if p.suffix == '.py' else 'report'}: {p}"))
    return Group(*parts)


def _op(op: str, detail: str) -> str:
    return f"{op}({detail})" if detail else op


def _module(path: str, mtype: str) -> str:
    return f"{path} ({mtype})" if path else mtype
