"""The audit result object. Plain records plus rendering entry points; imports no torch."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .collector import collector_paused
from .errors import ChannelsLastError
from .records import AuditMeta, Finding, FindingKind, Fix, Hotspot, NodeRecord, Region, Summary
from .report.files import write_text_atomic
from .report.serialize import json_text, report_dict
from .report.text import fmt_bytes, headline, offender_line

if TYPE_CHECKING:
    from .analyze.verdict import Verdict
    from .capture.kept import KeptGraph
    from .fix.repair import RepairLog
    from .timing.measure import Measurement

__all__ = ["AuditReport", "channels_last_error"]


@dataclass(frozen=True, repr=False)
class AuditReport:
    """The result of one audit. Displays itself in a notebook; ``to_json()`` for tools.

    >>> import torch
    >>> from nhwc_audit import audit
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.InstanceNorm2d(8))
    >>> r = audit(m, torch.randn(1, 3, 16, 16), bandwidth=1e9)
    >>> [(f.node, f.kind.value) for f in r.findings]
    [('_1', 'revert')]
    """

    meta: AuditMeta
    nodes: tuple[NodeRecord, ...]
    findings: tuple[Finding, ...]
    fixes: tuple[Fix, ...]
    hotspots: tuple[Hotspot, ...]
    regions: tuple[Region, ...]
    summary: Summary
    timing: dict[str, float] = field(default_factory=dict, compare=False)
    verdict: Verdict | None = None
    repair: RepairLog | None = None
    repaired_code: str | None = field(default=None, compare=False)
    repaired_module: Any = field(default=None, compare=False)
    """The repaired torch.fx GraphModule (channels_last weights), after ``repaired()``."""
    measurement: Measurement | None = field(default=None, compare=False)
    source: tuple[Any, ...] | None = field(default=None, compare=False)
    """(model, args, kwargs) as given, for repair()/measure(); never serialized or modified."""
    capture: KeptGraph | None = field(default=None, compare=False)
    """The fx graph the audit captured (real mode), reused by repair()/measure(); never serialized."""
    rerun: Callable[..., AuditReport] | None = field(default=None, compare=False, repr=False)
    """``rerun(module, capture=None)`` audits a module on this audit's sample with its options (``capture``,
    when given, instead of its capture), in the module's own dtype and without autocast, as a repair runs
    (real mode): the repair of a model torch.fx cannot trace audits its result, and each part on the inputs
    it gets (``args=``, ``kwargs=``, ``as_built=``, ``train=``: :func:`~nhwc_audit.pipeline.rerun_audit`)."""

    @property
    def incompatible_nodes(self) -> list[NodeRecord]:
        """Records of the nodes that have a finding a change to the model can remove, in graph order."""
        names = {f.node for f in self.findings if not f.intrinsic}
        return [r for r in self.nodes if r.name in names]

    def findings_of(self, kinds: Iterable[FindingKind]) -> list[Finding]:
        """The findings of ``kinds`` but the :attr:`~nhwc_audit.records.Finding.intrinsic` ones."""
        wanted = frozenset(kinds)
        return [f for f in self.findings if f.kind in wanted and not f.intrinsic]

    def offenders(self, kinds: Iterable[FindingKind]) -> list[Finding]:
        """:meth:`findings_of`, as ``check()`` and ``--fail-on`` list them: breaks first (a converted
        model that raises there), then the rest in graph order (causes before the conversions they cause)."""
        return sorted(self.findings_of(kinds), key=lambda f: f.kind is not FindingKind.BREAK)

    def to_dict(self) -> dict[str, Any]:
        from .report.serialize import extras_dict

        d = report_dict(
            self.meta, self.nodes, self.findings, self.fixes, self.hotspots, self.regions, self.summary, self.timing
        )
        return extras_dict(d, self.verdict, self.repair, self.measurement)

    def repaired(self, **options: Any) -> AuditReport:
        """This report with a repaired graph attached and the verdict updated
        (:func:`nhwc_audit.followups.repair_report`)."""
        from .followups import repair_report

        return repair_report(self, **options)

    def measure(self, *, train: bool = False, rounds: int = 5) -> AuditReport:
        """This report with timings of NCHW, naive channels_last and (when repaired) the
        repaired model attached, and the verdict decided by them
        (:func:`nhwc_audit.followups.measure_report`)."""
        from .followups import measure_report

        return measure_report(self, train=train, rounds=rounds)

    def to_json(self, *, indent: int | None = 2) -> str:
        """The report as JSON (schema ``nhwc-audit/1``, documented in the README): one key,
        node, finding or module per line (``indent`` spaces a level); ``indent=None``: all on
        one line. Built with the collector paused (:mod:`nhwc_audit.collector`)."""
        with collector_paused():
            if indent is None:
                return json.dumps(self.to_dict(), ensure_ascii=False) + "\n"
            return json_text(self.to_dict(), indent=indent) + "\n"

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON report atomically (temporary file, then rename)."""
        return write_text_atomic(Path(path), self.to_json())

    @property
    def nothing_to_audit(self) -> bool:
        """No node produced a 4D/5D activation: channels_last does not apply."""
        return self.summary.spatial_nodes == 0

    @property
    def headline(self) -> str:
        """The audit in one line (:func:`nhwc_audit.report.text.headline`)."""
        return headline(self.meta, self.summary)

    def __repr__(self) -> str:
        return f"<AuditReport {self.headline}>"

    def __str__(self) -> str:
        lines = [self.headline]
        for f in self.findings:
            lines.append(f"  {offender_line(f)}")
        return "\n".join(lines)

    def save_html(self, path: str | os.PathLike[str]) -> Path:
        """Write the self-contained HTML report atomically (temporary file, then rename)."""
        from .report.html import write_html

        return write_html(self, path)

    def to_html(self) -> str:
        """The full self-contained HTML report as a string."""
        from .report.html import render_html

        return render_html(self)

    def _repr_html_(self) -> str:
        from .report.html import render_notebook

        return render_notebook(self)


def channels_last_error(report: AuditReport, offenders: Sequence[Finding]) -> ChannelsLastError:
    """The error ``check()`` raises: the model, the offenders' count and bytes, one line each."""
    names, own = {f.node for f in offenders}, sum(f.bytes for f in offenders)
    fixed = sum(x.bytes for x in report.fixes if names & set(x.roots))  # with the conversions they cause
    caused = f" ({fmt_bytes(fixed)} with the conversions and mixed ops they cause)" if fixed > own else ""
    head = f"{len(offenders)} offending node(s), {fmt_bytes(own)} moved {report.summary.per}{caused}"
    lines = [f"{report.meta.model} does not stay channels_last: {head}"]
    lines += [f"  {i}. {offender_line(f)}" for i, f in enumerate(offenders, 1)]
    return ChannelsLastError("\n".join(lines), offenders=tuple(offenders))
