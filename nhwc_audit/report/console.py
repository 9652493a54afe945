"""Terminal summary, built with rich (tables, colour only on a terminal, NO_COLOR honoured).

``render_summary`` returns a renderable; only the CLI prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..records import FindingKind
from .text import (
    cost_line,
    count_parts,
    fake_note,
    fmt_bytes,
    fmt_seconds,
    fmt_share,
    run_description,
    share_line,
    short_source,
    untimed_lines,
)

if TYPE_CHECKING:
    from ..result import AuditReport

__all__ = ["render_audit", "render_outcome", "render_summary"]

_KIND_STYLE = {
    FindingKind.BREAK: "bold red",
    FindingKind.LATENT: "red",
    FindingKind.REVERT: "red",
    FindingKind.MIXED: "yellow",
    FindingKind.CONVERSION: "magenta",
    FindingKind.BACKWARD: "blue",
    FindingKind.DIVERGENCE: "dim",
}


def render_summary(report: AuditReport, *, top: int = 10, paths: tuple[Path, ...] = ()) -> RenderableType:
    """The audit (:func:`render_audit`), then its outcome (:func:`render_outcome`)."""
    return Group(render_audit(report, top=top), render_outcome(report, paths=paths))


def render_audit(report: AuditReport, *, top: int = 10) -> RenderableType:
    """Run line, counts, share, notes, the top hotspots and what to change."""
    m, s = report.meta, report.summary
    head = Text.assemble((m.model, "bold"), f" ({run_description(m)})")
    counts = Text(f"{s.nodes} nodes: ")
    for i, (text, kind) in enumerate(count_parts(m, s)):
        counts.append(", " if i else "")
        nonzero = not text.startswith("0 ")
        counts.append(text, style=_KIND_STYLE[kind] if kind is not None and nonzero else "")
    counts.append(f"; {cost_line(m, s)}")
    verdict = Text(share_line(s), style="green" if s.findings == 0 and s.spatial_nodes else "")
    parts: list[RenderableType] = [head, counts, verdict]
    fake = fake_note(m)
    if fake is not None:
        parts.append(Text(fake, style="yellow"))
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
                f.module_label,
                f.op_label,
                "x".join(map(str, f.shape)),
                short_source(f.source),
                fmt_bytes(f.bytes),
                fmt_share(h.share),
            )
        parts.append(table)
        if len(report.hotspots) > top:
            parts.append(Text(f"... and {len(report.hotspots) - top} more hotspots in the report"))
    divergent = [f for f in report.findings if f.kind is FindingKind.DIVERGENCE]
    if divergent:
        parts.append(Text(f"Real and fake kernels disagree at {len(divergent)} node(s):", style="bold"))
        for f in divergent:
            at = f" at {short_source(f.source)}" if f.source else ""
            parts.append(Text(f"  {f.node} = {f.op_label} in {f.module_label}{at}: {f.hint}", style="dim"))
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
    return Group(*parts)


def render_outcome(report: AuditReport, *, paths: tuple[Path, ...] = ()) -> RenderableType:
    """The repair and the measurement when there are any, the verdict, the files written."""
    parts: list[RenderableType] = []
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
        for line in untimed_lines(report.measurement, report.findings):
            parts.append(Text(line, style="yellow"))
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
