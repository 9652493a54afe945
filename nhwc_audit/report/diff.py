"""Regressions, not inventories: two JSON reports in, what the newer one adds out. Findings are
matched by :func:`~nhwc_audit.records.finding_key` (kind, module path, op, source file), never by
node names, which renumber, nor by line numbers, which move when code above them changes;
several findings with one key (a line run in a loop, one op at two lines) count together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import UsageError
from ..records import finding_key
from .text import fmt_bytes

__all__ = ["Change", "ReportDiff", "diff_reports", "load_report"]

ChangeKind = Literal["new", "grown", "shrunk", "gone"]


@dataclass(frozen=True, slots=True)
class Change:
    """One finding key whose count or bytes differ between the two reports."""

    key: str
    kind: ChangeKind
    count_before: int
    count_after: int
    bytes_before: int
    bytes_after: int
    hint: str
    lines: tuple[int, ...] = ()
    """The source lines of the key's findings in the newer report (in the older one when gone)."""

    @property
    def where(self) -> str:
        """``key (line 13)``: the key and where its findings are."""
        if not self.lines:
            return self.key
        return f"{self.key} (line{'s' if len(self.lines) > 1 else ''} {', '.join(map(str, self.lines))})"

    @property
    def regression(self) -> bool:
        return self.kind in ("new", "grown")


@dataclass(frozen=True, slots=True)
class ReportDiff:
    changes: tuple[Change, ...]
    notes: tuple[str, ...] = ()
    """What differs between the two audits besides the model (:func:`_unlike`): their bytes compare
    only at the same inputs, dtype, mode and device."""

    @property
    def regressions(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.regression)

    def lines(self) -> list[str]:
        """One line per change, regressions first."""
        out = [f"note: {n}" for n in self.notes]
        if not self.changes:
            return [*out, "no change in findings"]
        for c in sorted(self.changes, key=lambda c: (not c.regression, c.kind, c.key)):
            counts = f"{c.count_before} -> {c.count_after}"
            sizes = f"{fmt_bytes(c.bytes_before)} -> {fmt_bytes(c.bytes_after)}"
            out.append(f"{c.kind:<6} {c.where}  ({counts} finding(s), {sizes})")
        return out

    def to_html(self, old: str, new: str) -> str:
        """A self-contained HTML page of the changes, regressions first."""
        from .html import jinja_environment

        ordered = sorted(self.changes, key=lambda c: (not c.regression, c.kind, c.key))
        template = jinja_environment().get_template("diff.html")
        return template.render(changes=ordered, regressions=len(self.regressions), old=old, new=new, notes=self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "notes": list(self.notes),
            "regressions": len(self.regressions),
            "changes": [
                {
                    "key": c.key,
                    "lines": list(c.lines),
                    "change": c.kind,
                    "count_before": c.count_before,
                    "count_after": c.count_after,
                    "bytes_before": c.bytes_before,
                    "bytes_after": c.bytes_after,
                    "hint": c.hint,
                }
                for c in self.changes
            ],
        }


@dataclass
class _Group:
    count: int = 0
    nbytes: int = 0
    hint: str = ""
    lines: set[int] = field(default_factory=set)


def _grouped(report: Mapping[str, Any]) -> dict[str, _Group]:
    """key -> count, bytes, hint and source lines over a JSON report's findings."""
    out: dict[str, _Group] = {}
    for f in report.get("findings", []):
        source = f.get("source") or {}
        key = finding_key(f["kind"], f["module_path"], f["op"], f.get("detail", ""), source.get("file"))
        g = out.setdefault(key, _Group())
        g.count += 1
        g.nbytes += int(f.get("bytes", 0))
        g.hint = g.hint or f.get("hint", "")
        if source.get("line") is not None:
            g.lines.add(int(source["line"]))
    return out


def diff_reports(before: Mapping[str, Any], after: Mapping[str, Any]) -> ReportDiff:
    """What ``after`` adds to ``before`` (new or grown findings: more of them, or more bytes) and
    what it removes (gone or shrunk)."""
    old, new = _grouped(before), _grouped(after)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        b, a = old.get(key, _Group()), new.get(key, _Group())
        if (b.count, b.nbytes) == (a.count, a.nbytes):
            continue
        if b.count == 0:
            kind: ChangeKind = "new"
        elif a.count == 0:
            kind = "gone"
        elif a.count > b.count or a.nbytes > b.nbytes:
            kind = "grown"
        else:
            kind = "shrunk"
        lines = tuple(sorted((a if a.count else b).lines))
        changes.append(Change(key, kind, b.count, a.count, b.nbytes, a.nbytes, a.hint or b.hint, lines))
    return ReportDiff(tuple(changes), _unlike(before, after))


def _shapes(report: Mapping[str, Any]) -> str:
    inputs = [*report.get("inputs", []), *report.get("keyword_inputs", [])]
    return ", ".join("x".join(map(str, i.get("shape", []))) for i in inputs) or "none"


def _unlike(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[str, ...]:
    """A note per setting the two audits ran with otherwise (inputs, dtype, mode, device): bytes
    scale with the inputs, and the kernels differ with the rest."""
    notes = []
    if (old := _shapes(before)) != (new := _shapes(after)):
        notes.append(f"the audits ran on other inputs ({old} -> {new}): their bytes do not compare")
    for key in ("dtype", "mode", "device"):
        if before.get(key) != after.get(key):
            notes.append(f"the audits ran with another {key} ({before.get(key)} -> {after.get(key)})")
    return tuple(notes)


def load_report(path: str | Path) -> dict[str, Any]:
    """A JSON report written by nhwc-audit, or a :class:`UsageError` saying what is wrong."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read the report {str(p)!r}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise UsageError(f"{str(p)!r} is not a JSON report: {e}") from e
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("nhwc-audit/"):
        raise UsageError(f"{str(p)!r} is not an nhwc-audit JSON report (no 'schema': 'nhwc-audit/1')")
    return data
