"""The optional steps after an audit: a repair and a measurement, attached to the report that
asked for them (the verdict updated). They reuse the audit's own fx graph and never modify the
model. ``AuditReport.repaired()`` and ``.measure()`` call these.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import torch
import torch.fx
from torch import nn

from .analyze.verdict import decide
from .errors import ConversionError, UsageError
from .fix.parts import parts_code, repair_parts
from .fix.repair import RepairLog, repair_model, repair_samples
from .fix.results import Sample
from .prepare.copy import own_dtype_name
from .records import NodeRecord, Summary
from .report.text import fmt_seconds, untimed_lines
from .timing.threads import threads_set

if TYPE_CHECKING:
    from .result import AuditReport

__all__ = ["measure_report", "repair_report"]


def _source(report: AuditReport) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    if report.source is None:
        raise UsageError(
            f"this report ({report.meta.mode} mode) does not hold a model to run: repair and measure "
            "need a real-mode audit of a model with real weights"
        )
    model, args, kwargs = report.source
    return model, args, kwargs


def _fx_graph(report: AuditReport) -> tuple[torch.fx.Graph | None, list[tuple[str, Any]]]:
    """The audit's torch.fx graph, when it captured one (repair and profiling run fx graphs),
    and what its get_attr nodes read (tensors made in forward, which fx keeps as constants on
    the audit's copy: a graph module of the user's model needs them too)."""
    kept = report.capture
    return (kept.graph, list(kept.attributes)) if kept is not None else (None, [])


def _fx_audit(report: AuditReport) -> AuditReport | None:
    """An audit of the model with torch.fx, as the report's ``rerun`` audits, for a report captured
    otherwise (``capture='hooks'`` or ``'export'``, or the fallback after a trace eager did not vouch
    for) when the model traces; else None. A repair rewrites its graph and charges each node beyond
    what it moves NCHW, as it does an fx audit's: re-traced without that baseline, it charged whole a
    copy the model makes in either layout (a channel shuffle's: 131,072 B a forward reported 262,144)."""
    if report.capture is not None or report.rerun is None or report.source is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fx = report.rerun(report.source[0], capture="fx")
    except Exception:  # (it does not trace: the repair goes part by part)
        return None
    return fx if fx.capture is not None else None


def _checked(report: AuditReport) -> bool:
    """The audit's fx graph was checked against eager (a forced or unverified capture is not)."""
    return report.capture is None or report.capture.checked


class _FromAudit(TypedDict, total=False):
    graph: torch.fx.Graph | None
    graph_checked: bool
    constants: list[tuple[str, Any]]
    baseline: dict[str, tuple[int, int]] | None
    traced_writes: tuple[str, ...] | None


def _from_audit(audited: AuditReport, charged: bool) -> _FromAudit:
    """:func:`~.fix.repair.repair_model`'s options from an audit's fx capture: its graph (None where it
    has none), whether eager vouched for it, its constants, the buffers its trace wrote, and, where
    ``charged`` and a graph keeps the audit's node names, what each node moves and its kernels copy
    inside when the model runs NCHW."""
    graph, constants = _fx_graph(audited)
    baseline = {r.name: (r.nchw_bytes, r.nchw_inside) for r in audited.nodes if r.nchw_bytes or r.nchw_inside}
    return _FromAudit(
        graph=graph,
        graph_checked=_checked(audited),
        constants=constants,
        baseline=baseline if graph is not None and charged else None,
        traced_writes=audited.capture.traced_writes if audited.capture is not None else None,
    )


def _decided_on(report: AuditReport) -> tuple[Sequence[NodeRecord], Summary]:
    """What a verdict is decided on: the repaired graph's records and summary when a repair
    changed the model, else the audit's."""
    rp = report.repair
    if rp is not None and rp.changed and rp.summary_after is not None:
        return rp.records_after, rp.summary_after
    return report.nodes, report.summary


def repair_report(report: AuditReport, **options: Any) -> AuditReport:
    """``report`` with a repaired graph attached (``repair``, ``repaired_code``,
    ``repaired_module``) and the verdict updated. The repair starts from the audit's own
    torch.fx graph when it has one (no second trace)."""
    model, args, kwargs = _source(report)
    own = own_dtype_name(model)
    same_run = report.meta.autocast is None and report.meta.dtype == own
    audited = _fx_audit(report) or report
    # the audit's graph keeps its node names: each is charged what it adds over NCHW, as in the
    # audit, when the repair runs as the audit did (it runs the model in its own dtype, no autocast)
    given = _from_audit(audited, charged=same_run or audited is not report)
    # a train audit's repair counts a backward pass too, each node beyond what it moves in NCHW
    backward = (
        {r.name: (r.nchw_backward_bytes, r.nchw_backward_inside) for r in audited.nodes}
        if report.meta.backward
        else None
    )
    with threads_set(report.meta.threads):  # kernels choose by it: the repair runs as the audit ran
        try:
            gm, log = repair_model(
                model,
                args,
                kwargs,
                bandwidth=report.meta.bandwidth,
                backward=backward,
                **given,
                **options,
            )
            module: nn.Module = gm
            code = gm.code
        except ConversionError as e:
            if given.get("graph") is not None and audited is report:
                raise
            module, log = _repaired_parts(report, e, same_run, options)
            code = parts_code(module)
    if audited is not report and isinstance(module, torch.fx.GraphModule):
        note = (
            f"the audit captured with {report.meta.capture}; the model traces, so the repair audited it again "
            "with torch.fx and rewrote that graph"
        )
        log = dataclasses.replace(log, notes=(*log.notes, note))
    repaired = dataclasses.replace(report, repair=log, repaired_code=code, repaired_module=module)
    if not log.changed:
        return repaired  # the model as audited: its verdict stands
    # decided on the repaired graph: its breaks, its share of channels_last nodes and bytes
    records, summary = _decided_on(repaired)
    meta = report.meta
    verdict = decide(records, summary, device=meta.device, dtype=meta.compute_dtype, bytes_moved=log.bytes_after)
    return dataclasses.replace(repaired, verdict=verdict)


def _repaired_parts(
    report: AuditReport, whole: ConversionError, same_run: bool, options: dict[str, Any]
) -> tuple[nn.Module, RepairLog]:
    """The repair of a model torch.fx cannot trace as a whole, part by part (:mod:`.fix.parts`); the
    whole audited again as ``report`` was, in the model's own dtype (and, unless ``same_run``, the
    original too: the log's two figures come from audits alike)."""
    model, args, kwargs = _source(report)
    rerun = report.rerun
    if rerun is None:
        raise UsageError("this report cannot audit a repaired model again: repair needs a real-mode audit")

    def reaudit(m: nn.Module) -> tuple[tuple[NodeRecord, ...], Summary]:
        again = rerun(m)
        return again.nodes, again.summary

    return repair_parts(
        model,
        repair_samples(model, args, kwargs),
        report.findings,
        whole_error=whole,
        repair=functools.partial(_part_repair, rerun, report.meta.bandwidth, options),
        reaudit=reaudit,
        before=(report.nodes, report.summary) if same_run else reaudit(model),
        grads=options.get("grads", True),
    )


def _part_repair(
    rerun: Callable[..., AuditReport],
    bandwidth: float,
    options: dict[str, Any],
    part: nn.Module,
    sample: Sample,
    built: Sample | None,
) -> tuple[torch.fx.GraphModule, RepairLog]:
    """A part's repair (:mod:`.fix.parts`) from its own torch.fx audit on the inputs it gets in the
    channels_last model, whose NCHW baseline runs it on those the NCHW model hands it (``built``):
    its steps are charged what they add over NCHW, as a whole graph's are; where that audit fails, the
    repair traces the part itself (and says why it cannot, as a repair: a branch the trace took). Forward only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            audited = rerun(part, capture="fx", args=sample[0], kwargs=sample[1], as_built=built, train=False)
    except Exception:
        audited = None
    given = _from_audit(audited, charged=True) if audited is not None and audited.capture is not None else _FromAudit()
    return repair_model(part, *sample, bandwidth=bandwidth, **given, **options)


def measure_report(report: AuditReport, *, train: bool = False, rounds: int = 5) -> AuditReport:
    """``report`` with timings of NCHW, naive channels_last and (when repaired) the repaired
    model attached, and the verdict decided by them."""
    from .timing.measure import measure

    model, args, kwargs = _source(report)
    graph, constants = _fx_graph(report)
    # copy times of the nodes that change layout (a pad in an NCHW region copies too), when the
    # profiled graph is the audit's own (else its node names are not the findings')
    moving = frozenset(f.node for f in report.findings if f.bytes > 0) if graph is not None else None
    with threads_set(report.meta.threads):  # timed as audited (--threads)
        m = measure(
            model,
            args,
            kwargs,
            repaired=report.repaired_module,
            train=train,
            rounds=rounds,
            graph=graph,
            constants=constants,
            nodes=moving,
        )
    naive, repaired = m.speedup("channels_last"), m.speedup("repaired")
    speeds = [s for s in (naive, repaired) if s is not None]
    lines = [
        f"{t.variant}: {fmt_seconds(t.median)} per {'step' if train else 'forward'} "
        f"(min {fmt_seconds(t.low)}, max {fmt_seconds(t.high)}, {t.rounds} rounds)"
        for t in m.timings
    ] + untimed_lines(m, report.findings)
    records, summary = _decided_on(report)
    needs_repair = repaired is not None and repaired > (naive or 0.0)
    verdict = decide(
        records,
        summary,
        device=report.meta.device,
        dtype=report.meta.compute_dtype,
        speedup=max(speeds) if speeds else None,
        needs_repair=needs_repair,
        measured=lines,
        rounds=m.round_speedups("repaired" if needs_repair else "channels_last"),
    )
    return dataclasses.replace(report, measurement=m, verdict=verdict)
