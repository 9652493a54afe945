"""Terminal summary, built with rich (tables, colour only on a terminal, NO_COLOR honoured).

``render_summary`` returns a renderable; only the CLI prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from ..records import FindingKind
from .text import (
    cost_line,
    count_parts,
    deviation_line,
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


_COLUMNS = ("#", "kind", "node", "module", "op", "shape", "source", "bytes", "share")
_RIGHT = {"#", "bytes", "share"}
_DROP_ORDER = ("shape", "node", "share", "op")
"""Columns given up, in this order, when the terminal is too narrow; what is left wraps
(module and source), and nothing is cut short with an ellipsis."""
_WRAPS = {"module", "source"}


class _Fitted:
    """The hotspot table at the console's width: columns dropped by priority, the rest wrapped."""

    def __init__(self, rows: list[dict[str, Text]]) -> None:
        self.rows = rows

    def _width(self, col: str) -> int:
        return max([len(col), *(r[col].cell_len for r in self.rows)])

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        columns = list(_COLUMNS)
        gaps = 2  # rich's default padding between columns of a SIMPLE_HEAD table without edges

        def needed(cols: list[str]) -> int:
            fixed = sum(self._width(c) for c in cols if c not in _WRAPS)
            wrapping = sum(min(self._width(c), 24) for c in cols if c in _WRAPS)
            return fixed + wrapping + gaps * (len(cols) - 1)

        for col in _DROP_ORDER:
            if needed(columns) <= options.max_width:
                break
            columns.remove(col)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=None)
        for col in columns:
            wraps = col in _WRAPS
            table.add_column(
                col,
                justify="right" if col in _RIGHT else "left",
                no_wrap=not wraps,
                overflow="fold" if wraps else "ellipsis",
                min_width=None if wraps else self._width(col),
            )
        for row in self.rows:
            table.add_row(*(row[c] for c in columns))
        yield table


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
    fake = fake_note(m)
    parts: list[RenderableType] = [head, *([Text(fake, style="yellow")] if fake else []), counts, verdict]
    for note in m.capture_notes:
        parts.append(Text(f"note: {note}", style="dim"))
    shown = report.hotspots[:top]
    if shown:
        rows = [
            {
                "#": Text(str(h.rank)),
                "kind": Text(h.finding.kind_label, _KIND_STYLE[h.finding.kind]),
                "node": Text(h.finding.node),
                "module": Text(h.finding.module_label),
                "op": Text(h.finding.op_label),
                "shape": Text("x".join(map(str, h.finding.shape))),
                "source": Text(short_source(h.finding.source)),
                "bytes": Text(fmt_bytes(h.finding.bytes)),
                "share": Text(fmt_share(h.share)),
            }
            for h in shown
        ]
        table = _Fitted(rows)
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
                f" layout changes {fmt_bytes(rp.bytes_before)} -> {fmt_bytes(rp.bytes_after)} {rp.per}, "
                f"breaks {rp.breaks_before} -> {rp.breaks_after}" + (f" ({rp.unchanged})" if rp.unchanged else "")
            )
        )
        for st in rp.steps:
            per = "" if rp.steps_per == rp.per else f" {rp.steps_per}"
            parts.append(Text(f"  {st.kind:<24} {st.node}: {st.reason} (-{fmt_bytes(st.bytes_saved)}{per})"))
        for msg in rp.refused:
            parts.append(Text(f"  refused: {msg}", style="yellow"))
        for msg in rp.notes:
            parts.append(Text(f"  note: {msg}"))
        if (numerics := deviation_line(rp)) is not None:
            parts.append(Text(f"  {numerics}"))
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
        parts.append(Text(f"{'repaired model' if p.is_dir() else 'report'}: {p}"))
    return Group(*parts)
