"""One audit, stage by stage: prepare -> capture and propagate -> (backward) -> analyze ->
verdict -> the report. Real and fake audits take the same path; they differ only in how the
private copy is made and how the model runs (:class:`~nhwc_audit.propagate.runner.Runner`).
Mode 'both' is a real audit and a fake one of the same capture, compared node by node.

The caller (:mod:`nhwc_audit.api`) has resolved the user's arguments into
:class:`AuditOptions`; nothing here parses strings or prints.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .analyze.analysis import analyze
from .analyze.divergence import divergences
from .analyze.findings import find_findings
from .analyze.verdict import decide
from .collector import collector_paused
from .errors import PropagationError, SharedWeightWrite, ValueDependentShapes, first_line
from .layout import tensor_meta
from .prepare.caches import code_caches, emptied
from .prepare.copy import model_device, own_dtype_name, prepare_audit_copy, prepare_inputs, refuse_inference
from .prepare.fake import fake_copy, fake_inputs, fake_mode
from .prepare.notes import conversion_note, eval_train_note, one_channel_note
from .prepare.wrappers import unwrapped
from .propagate import onednn
from .propagate.baseline import fake_pays, training_fails
from .propagate.captured import value_dependent
from .propagate.chain import Captured, capture_and_propagate
from .propagate.inputs import keyword_metas
from .propagate.interpreter import ProgressFn
from .propagate.kernel_copies import callers_modes_note
from .propagate.runner import Runner, as_built_pairs
from .records import BACKWARD_NOT_AUDITED, AuditMeta, BandwidthSource, CaptureMethod, Mode, NodeRecord
from .refine import NO_BACKWARD, NchwPlan, with_backward, with_nchw_backward, with_nchw_baseline
from .result import AuditReport
from .tensors import iter_tensors
from .timing.bandwidth import measure_transpose_bandwidth
from .timing.memory import peak_rss
from .timing.threads import threads_set

__all__ = ["ASSUMED_BANDWIDTH", "AuditOptions", "run_audit"]

ASSUMED_BANDWIDTH = {"cuda": 1.5e12, "cpu": 1.0e10, "mps": 2.0e11}
"""Bytes/s a fake audit assumes per device type when none is given (nothing runs to time). CUDA:
what an H200's NCHW -> NHWC copy of 8-256 MB moved, 1.3-1.8 TB/s (its plain copies: ~4.3 TB/s)."""


@dataclass(frozen=True)
class AuditOptions:
    """Every option of an audit, resolved and checked (see :func:`nhwc_audit.audit`)."""

    device: torch.device
    """Where the audit runs: the model's device (real) or the predicted one (fake)."""
    dtype: torch.dtype | None = None
    bandwidth: float | None = None
    name: str | None = None
    capture: CaptureMethod = "auto"
    verify: bool = True
    autocast: torch.dtype | None = None
    mode: Mode = "real"
    train: bool = False
    """Run the model as training does (with autograd) and audit one backward pass."""
    backward: bool = True
    """With ``train``: the backward pass too (mode 'both''s fake half runs as the real one ran,
    with autograd, and compares forward layouts only)."""
    progress: ProgressFn | None = None
    threads: int | None = None
    """CPU threads to audit with (``torch.set_num_threads``, put back afterwards); None: as set."""
    as_built: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    """The sample as the NCHW model gets it, if not its NCHW copy (:attr:`.Runner.as_built`)."""


@dataclass(frozen=True)
class _Prepared:
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    runner: Runner
    permuted: bool = False
    """Some weights are the user's restrided: their values come out permuted."""


def _prepare(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    o: AuditOptions,
    raw: bool = False,
    share_weights: bool = True,
) -> _Prepared:
    """The private channels_last copy and sample, and how they run (``raw``: a fake run keeps
    the meta kernels' layouts, uncorrected; ``share_weights``: see
    :func:`~nhwc_audit.prepare.copy.prepare_audit_copy`)."""
    refuse_inference(module, o.train)
    if o.mode == "fake":
        fmode = fake_mode()
        copy = fake_copy(module, fmode, o.device, o.dtype)
        fargs, fkwargs = fake_inputs(args, kwargs, fmode, o.device, o.dtype)
        runner = Runner(
            o.device.type, o.autocast, fake_mode=fmode, correct=not raw, caches=code_caches(module), grad=o.train
        )
        return _Prepared(copy, fargs, fkwargs, runner)
    target = o.device if o.device != model_device(module) else None
    audit_copy = prepare_audit_copy(module, dtype=o.dtype, device=target, share_weights=share_weights)
    sargs, skwargs = prepare_inputs(args, kwargs, dtype=o.dtype, device=o.device)
    runner = Runner(
        o.device.type,
        o.autocast,
        audit_copy.shared,
        caches=code_caches(module),
        grad=o.train,
        as_built=as_built_pairs((sargs, skwargs), o.as_built),
    )
    return _Prepared(audit_copy.module, sargs, skwargs, runner, audit_copy.permuted)


def _capture(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], o: AuditOptions, raw: bool
) -> tuple[Captured, _Prepared]:
    p = _prepare(module, args, kwargs, o, raw)

    def run(p: _Prepared) -> Captured:
        with emptied(p.runner.caches):  # a trace leaves proxies there, an export fake tensors
            return capture_and_propagate(
                p.module,
                p.args,
                p.kwargs,
                method=o.capture,
                verify=o.verify,
                progress=o.progress,
                runner=p.runner,
                need_graph=o.train,
            )

    try:
        captured = run(p)
    except SharedWeightWrite as e:
        # caught before the write (or before a shape made from permuted values): start again
        # on weights of the audit's own
        values = ", whose values are the model's" if isinstance(e, ValueDependentShapes) else ""
        why = f"{e}: audited on copies of the weights{values}"
    else:
        dynamic = value_dependent(captured.records) if p.permuted else []
        if not dynamic:
            return captured, p
        # the restrided weights' values are permuted: shapes made from values would not be the model's
        why = f"shapes depend on tensor values ({', '.join(dynamic)}): audited on copies of the weights, whose values are the model's"
    p = _prepare(module, args, kwargs, o, raw, share_weights=False)
    captured = run(p)
    return dataclasses.replace(captured, notes=(*captured.notes, why)), p


def _bandwidth(o: AuditOptions) -> tuple[float, BandwidthSource]:
    if o.bandwidth is not None:
        return o.bandwidth, "user"
    if o.mode == "fake":
        return ASSUMED_BANDWIDTH.get(o.device.type, 1.0e10), "assumed"
    return measure_transpose_bandwidth(str(o.device)), "measured"


def _unaudited(notes: tuple[str, ...]) -> bool:
    return any(n.startswith(BACKWARD_NOT_AUDITED) for n in notes)


def _backward(captured: Captured, p: _Prepared) -> tuple[list[NodeRecord], tuple[str, ...], NchwPlan]:
    """:func:`~.refine.with_backward`, or, where its backward raises, a clear error when the model
    as built fails to train in eager PyTorch too (``z.mul_(2)`` on a tensor autograd saved: it
    cannot train as written), else a note that the backward was not audited."""
    try:
        return with_backward(captured, p.runner)
    except RuntimeError as e:
        why = first_line(e)
    eager = training_fails(p.module, p.args, p.kwargs, p.runner)
    if eager is not None:  # (an in-place write to what autograd saved, an op with no autograd formula)
        fix = (
            "make the op it names out of place (z = z * 2 for z.mul_(2))" if "inplace" in eager else "fix what it names"
        )
        raise PropagationError(
            f"train=True: the model's backward raises in eager PyTorch too ({eager}); {fix}, or audit without "
            "--train (API: train=False)"
        )
    return (
        captured.records,
        (f"{BACKWARD_NOT_AUDITED} (the {captured.method} graph's backward raised: {why})",),
        NO_BACKWARD,
    )


def _audit_one(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], o: AuditOptions, *, raw: bool = False
) -> AuditReport:
    t0 = time.perf_counter()
    module, wrapper = unwrapped(module)  # torch.compile's module, DataParallel: what they wrap
    captured, p = _capture(module, args, kwargs, o, raw)
    t1 = time.perf_counter()
    records, grad_notes, plan = (
        _backward(captured, p) if o.train and o.backward else (captured.records, (), NO_BACKWARD)
    )
    t2 = time.perf_counter()
    bandwidth, source = _bandwidth(o)
    t3 = time.perf_counter()
    found = find_findings(records, bandwidth=bandwidth, device=o.device.type)
    fake = o.mode == "real" and fake_pays(t1 - t0, len(records))
    baselined, baseline_notes = with_nchw_baseline(
        records, found, captured, p.module, p.args, p.kwargs, p.runner, fake=fake, device=o.device.type
    )
    if o.train and o.backward:
        baselined, backward_notes = with_nchw_backward(baselined, captured, p.runner, plan)
        baseline_notes += backward_notes
    unchanged, records = baselined is records, baselined  # else copies made in NCHW too are charged less
    analysis = analyze(records, bandwidth=bandwidth, device=o.device.type, findings=found if unchanged else None)
    dtype = str(o.dtype).removeprefix("torch.") if o.dtype is not None else own_dtype_name(module)
    if captured.capture is not None:
        captured.capture.release()  # nothing runs it from here on; what the report keeps is the graph
    rank = max({t.dim() for t in iter_tensors((p.args, p.kwargs))} & {4, 5}, default=None)
    notes = (
        wrapper,
        conversion_note(module, rank),
        one_channel_note(args, kwargs),
        eval_train_note(module, o.train),
        callers_modes_note(o.mode),
        # (the audit's copy: a parametrized weight read runs its parametrization, spectral_norm's in place)
        onednn.note(p.module, o.device.type, o.train and o.backward, o.autocast or o.dtype),
    )
    meta = AuditMeta(
        model=o.name or type(module).__name__,
        torch_version=torch.__version__,
        capture=captured.method,
        capture_notes=captured.notes + tuple(n for n in notes if n) + grad_notes + baseline_notes,
        mode=o.mode,
        device=str(o.device),
        dtype=dtype,
        autocast=str(o.autocast).removeprefix("torch.") if o.autocast is not None else None,
        training=module.training,
        inputs=tuple(tensor_meta(a) for a in iter_tensors(p.args)),  # in lists too (detection models)
        keyword_inputs=keyword_metas(p.kwargs),
        bandwidth=bandwidth,
        bandwidth_source=source,
        backward=o.train and o.backward and captured.capture is not None and not _unaudited(grad_notes),
        threads=torch.get_num_threads(),
        modules=tuple((path, type(m).__name__) for path, m in p.module.named_modules()),  # (wrappers unwrapped)
    )
    t4 = time.perf_counter()
    timing = {
        "capture_and_propagate_s": t1 - t0,
        "backward_s": t2 - t1,
        "bandwidth_s": t3 - t2,
        "analyze_s": t4 - t3,
        "total_s": t4 - t0,
        "peak_rss_bytes": float(peak_rss()),
    }
    return AuditReport(
        meta=meta,
        nodes=tuple(records),
        findings=analysis.findings,
        fixes=analysis.fixes,
        hotspots=analysis.hotspots,
        regions=analysis.regions,
        summary=analysis.summary,
        timing=timing,
        verdict=decide(records, analysis.summary, device=str(o.device), dtype=meta.compute_dtype),
        source=(module, args, kwargs) if o.mode == "real" else None,
        capture=captured.kept if o.mode == "real" else None,
        rerun=functools.partial(rerun_audit, args=args, kwargs=kwargs, o=_repairs(o)) if o.mode == "real" else None,
    )


def _repairs(o: AuditOptions) -> AuditOptions:
    """The options a repair's audit runs with (:attr:`AuditReport.rerun`): the model in its own dtype,
    no autocast, no progress callback (the report keeps them: not the caller's display)."""
    return dataclasses.replace(o, dtype=None, autocast=None, progress=None)


def rerun_audit(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    o: AuditOptions,
    capture: CaptureMethod | None = None,
    *,
    as_built: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    train: bool | None = None,
) -> AuditReport:
    """:attr:`AuditReport.rerun`: ``module`` audited as ``o`` says, with ``capture``, ``train`` and
    :attr:`AuditOptions.as_built` when given (a part of the model, on the inputs it gets there)."""
    train = o.train if train is None else train
    return run_audit(
        module, args, kwargs, dataclasses.replace(o, capture=capture or o.capture, train=train, as_built=as_built)
    )


def run_audit(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], o: AuditOptions) -> AuditReport:
    """Audit ``module`` on the sample ``(args, kwargs)`` as the options say."""
    with threads_set(o.threads), collector_paused():
        return _run(module, args, kwargs, o)


def _run(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], o: AuditOptions) -> AuditReport:
    if o.mode != "both":
        return _audit_one(module, args, kwargs, o)
    real = _audit_one(module, args, kwargs, dataclasses.replace(o, mode="real"))
    # the fake run propagates the capture the real run used, so that node names match, as it ran
    # (with autograd for a train audit); its forward layouts are what is compared (no backward)
    same = dataclasses.replace(o, mode="fake", capture=real.meta.capture, bandwidth=real.meta.bandwidth)
    fake = _audit_one(module, args, kwargs, dataclasses.replace(same, backward=False), raw=True)
    extra = divergences(real.nodes, fake.nodes, real.meta.device)
    return dataclasses.replace(
        real,
        meta=dataclasses.replace(real.meta, mode="both"),
        findings=tuple(sorted(real.findings + tuple(extra), key=lambda f: f.index)),
        summary=dataclasses.replace(real.summary, divergences=len(extra)),
    )
