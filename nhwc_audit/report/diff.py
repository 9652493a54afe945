"""Regressions, not inventories: two JSON reports in, what the newer one adds out. Findings are
matched by :func:`~nhwc_audit.records.finding_key` (kind, module path, op, source line), never by
node names, which renumber; several findings with one key (a line run in a loop) count together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
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

    @property
    def regression(self) -> bool:
        return self.kind in ("new", "grown")


@dataclass(frozen=True, slots=True)
class ReportDiff:
    changes: tuple[Change, ...]

    @property
    def regressions(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.regression)

    def lines(self) -> list[str]:
        """One line per change, regressions first."""
        if not self.changes:
            return ["no change in findings"]
        out = []
        for c in sorted(self.changes, key=lambda c: (not c.regression, c.kind, c.key)):
            counts = f"{c.count_before} -> {c.count_after}"
            sizes = f"{fmt_bytes(c.bytes_before)} -> {fmt_bytes(c.bytes_after)}"
            out.append(f"{c.kind:<6} {c.key}  ({counts} finding(s), {sizes})")
        return out

    def to_html(self, old: str, new: str) -> str:
        """A self-contained HTML page of the changes, regressions first."""
        from .html import jinja_environment

        ordered = sorted(self.changes, key=lambda c: (not c.regression, c.kind, c.key))
        template = jinja_environment().get_template("diff.html")
        return template.render(changes=ordered, regressions=len(self.regressions), old=old, new=new)

    def to_dict(self) -> dict[str, Any]:
        return {
            "regressions": len(self.regressions),
            "changes": [
                {
                    "key": c.key,
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


def _grouped(report: Mapping[str, Any]) -> dict[str, tuple[int, int, str]]:
    """key -> (count, bytes, hint) over a JSON report's findings."""
    out: dict[str, tuple[int, int, str]] = {}
    for f in report.get("findings", []):
        source = f.get("source") or {}
        key = finding_key(
            f["kind"], f["module_path"], f["op"], f.get("detail", ""), source.get("file"), source.get("line")
        )
        count, nbytes, _ = out.get(key, (0, 0, ""))
        out[key] = (count + 1, nbytes + int(f.get("bytes", 0)), f.get("hint", ""))
    return out


def diff_reports(before: Mapping[str, Any], after: Mapping[str, Any]) -> ReportDiff:
    """What ``after`` adds to ``before`` (new or grown findings: more of them, or more bytes) and
    what it removes (gone or shrunk)."""
    old, new = _grouped(before), _grouped(after)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        cb, bb, hb = old.get(key, (0, 0, ""))
        ca, ba, ha = new.get(key, (0, 0, ""))
        if (cb, bb) == (ca, ba):
            continue
        if cb == 0:
            kind: ChangeKind = "new"
        elif ca == 0:
            kind = "gone"
        elif ca > cb or ba > bb:
            kind = "grown"
        else:
            kind = "shrunk"
        changes.append(Change(key, kind, cb, ca, bb, ba, ha or hb))
    return ReportDiff(tuple(changes))


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
