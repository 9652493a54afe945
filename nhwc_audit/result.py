"""The audit result object. Plain records plus rendering entry points; imports no torch."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ReportWriteError, UsageError
from .records import AuditMeta, Finding, FindingKind, Fix, Hotspot, NodeRecord, Region, Summary
from .report.serialize import report_dict
from .report.text import fmt_bytes, fmt_seconds, fmt_share

if TYPE_CHECKING:
    from .analyze.verdict import Verdict
    from .fix.rewrite import RepairLog
    from .timing.measure import Measurement

__all__ = ["AuditReport", "offender_line", "write_text_atomic"]


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

    @property
    def incompatible_nodes(self) -> list[NodeRecord]:
        """Records of the nodes that have a finding, in graph order."""
        names = {f.node for f in self.findings}
        return [r for r in self.nodes if r.name in names]

    def findings_of(self, kinds: Iterable[FindingKind]) -> list[Finding]:
        wanted = frozenset(kinds)
        return [f for f in self.findings if f.kind in wanted]

    def to_dict(self) -> dict[str, Any]:
        from .report.serialize import extras_dict

        d = report_dict(
            self.meta, self.nodes, self.findings, self.fixes, self.hotspots, self.regions, self.summary, self.timing
        )
        return extras_dict(d, self.verdict, self.repair, self.measurement)

    def repaired(self, **options: Any) -> AuditReport:
        """This report with a repaired graph attached (``repair``, ``repaired_code``) and the
        verdict updated. Needs the model the report was made from (``audit`` keeps it)."""
        import dataclasses

        from .fix.rewrite import repair_model

        model, args, kwargs = self._source()
        from .analyze.verdict import decide

        gm, log = repair_model(model, args, kwargs, bandwidth=self.meta.bandwidth, **options)
        verdict = decide(
            self.nodes, self.summary, device=self.meta.device, dtype=self.meta.dtype, bytes_moved=log.bytes_after
        )
        return dataclasses.replace(self, repair=log, repaired_code=gm.code, repaired_module=gm, verdict=verdict)

    def measure(self, *, train: bool = False, rounds: int = 5) -> AuditReport:
        """This report with timings of NCHW, naive channels_last and (when repaired) the
        repaired model attached, and the verdict decided by them."""
        import dataclasses

        from .analyze.verdict import decide
        from .timing.measure import measure

        model, args, kwargs = self._source()
        m = measure(model, args, kwargs, repaired=self.repaired_module, train=train, rounds=rounds)
        speeds = [s for s in (m.speedup("channels_last"), m.speedup("repaired")) if s is not None]
        lines = [
            f"{t.variant}: {fmt_seconds(t.median)} per {'step' if train else 'forward'} "
            f"(min {fmt_seconds(t.low)}, max {fmt_seconds(t.high)}, {t.rounds} rounds)"
            for t in m.timings
        ]
        verdict = decide(
            self.nodes,
            self.summary,
            device=self.meta.device,
            dtype=self.meta.dtype,
            speedup=max(speeds),
            measured=lines,
        )
        return dataclasses.replace(self, measurement=m, verdict=verdict)

    def _source(self) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        if self.source is None:
            raise UsageError("this report does not hold its model (it was loaded, not audited)")
        model, args, kwargs = self.source
        return model, args, kwargs

    def to_json(self, *, indent: int | None = 2) -> str:
        """The report as JSON (schema ``nhwc-audit/1``, documented in the README)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False) + "\n"

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON report atomically (temporary file, then rename)."""
        return write_text_atomic(Path(path), self.to_json())

    @property
    def nothing_to_audit(self) -> bool:
        """No node produced a 4D/5D activation: channels_last does not apply."""
        return self.summary.spatial_nodes == 0

    @property
    def headline(self) -> str:
        m, s = self.meta, self.summary
        shapes = ", ".join(t.shape_str for t in m.inputs)
        if self.nothing_to_audit:
            return (
                f"{m.model} ({m.capture}, {m.mode} {m.device}, {m.dtype}{' autocast ' + m.autocast if m.autocast else ''}, input {shapes}): {s.nodes} nodes, "
                "no 4D/5D activations: nothing to audit for channels_last"
            )
        return (
            f"{m.model} ({m.capture}, {m.mode} {m.device}, {m.dtype}{' autocast ' + m.autocast if m.autocast else ''}, input {shapes}): "
            f"{s.nodes} nodes, {s.reverts} reverts, {s.conversions} conversions, {s.mixed} mixed, "
            f"{s.breaks} breaks{f', {s.backward} backward' if s.backward else ''}"
            f"{f', {s.divergences} divergences' if s.divergences else ''}, {fmt_bytes(s.bytes_moved)} moved per forward "
            f"(~{fmt_seconds(s.est_seconds)} at {fmt_bytes(m.bandwidth)}/s), "
            f"{fmt_share(s.channels_last_node_share)} of spatial nodes channels_last"
        )

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


def offender_line(f: Finding) -> str:
    """One line per offender: kind, node, op, module, source, bytes, error, hint."""
    where = f"{f.module_path} ({f.module_type})" if f.module_path else f.module_type
    loc = f" at {f.location}" if f.location else ""
    cost = f", {fmt_bytes(f.bytes)}" if f.bytes else ""
    err = f" [{f.error}]" if f.error else ""
    return f"{f.kind.value}: {f.node} = {f.op} in {where}{loc}{cost}{err} -> {f.hint}"


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ReportWriteError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ReportWriteError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; reports are ordinary files
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ReportWriteError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
        raise
    return path
