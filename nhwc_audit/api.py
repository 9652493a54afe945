"""The Python API: ``audit``, ``check``, ``incompatible_nodes``, and the report object.

Composes the stages (load -> copy/convert -> capture -> propagate -> analyze) without
printing anything.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .analyze.findings import analyze
from .errors import ChannelsLastError, SharedWeightWrite, UsageError
from .layout import tensor_meta
from .prepare.copy import AuditCopy, model_device, prepare_audit_copy, prepare_inputs
from .prepare.load import split_example
from .propagate.chain import Captured, capture_and_propagate
from .propagate.interpreter import ProgressFn
from .records import AuditMeta, FindingKind, NodeRecord
from .report.text import fmt_bytes
from .result import AuditReport, offender_line
from .timing.bandwidth import measure_transpose_bandwidth

__all__ = ["DEFAULT_INPUT_SHAPE", "FAIL_ON", "AuditReport", "audit", "check", "incompatible_nodes", "repair"]

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)

FAIL_ON: dict[str, frozenset[FindingKind]] = {
    "never": frozenset(),
    "revert": frozenset({FindingKind.BREAK, FindingKind.REVERT, FindingKind.MIXED}),
    "any": frozenset(FindingKind),
}
"""What each ``fail_on`` level treats as failure: 'revert' = anything that leaves
channels_last (breaks, reverts, mixed ops); 'any' = conversions too."""


def _resolve_model(
    model: nn.Module | Callable[[], Any],
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None,
) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    built_args: tuple[Any, ...] | None = None
    built_kwargs: dict[str, Any] = {}
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise UsageError(f"audit() needs an nn.Module or a build function, got {type(model).__name__}")
        from .prepare.load import _call_build_fn

        model, built_args, built_kwargs = split_example(
            _call_build_fn(model, getattr(model, "__name__", "build_fn")), "build_fn"
        )
    if example_inputs is None:
        args = built_args
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise UsageError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    if args is None:
        g = torch.Generator().manual_seed(0)
        args = (torch.randn(DEFAULT_INPUT_SHAPE, generator=g),)
    kwargs = dict(built_kwargs)
    kwargs.update(example_kwargs or {})
    return model, args, kwargs


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    dev = torch.device(device) if device is not None else model_device(model)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' is not available on this machine: audit on cpu, or run on a machine with a GPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' is not available on this machine: audit on cpu")
    return dev


def audit(
    model: nn.Module | Callable[[], Any],
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    bandwidth: float | None = None,
    name: str | None = None,
    capture: str = "auto",
    verify: bool = True,
    autocast: bool | torch.dtype = False,
    mode: str = "real",
    train: bool = False,
    progress: ProgressFn | None = None,
) -> AuditReport:
    """Audit ``model`` on a channels_last copy of ``example_inputs``.

    ``model`` is an nn.Module or a build function returning one (or ``(module, args)``,
    ``(module, args, kwargs)``). Inputs default to one ``1x3x224x224`` tensor. The model
    and the inputs are never modified: the audit runs a channels_last copy (weights read in
    place with channels_last strides, not copied: see
    :func:`~nhwc_audit.prepare.copy.prepare_audit_copy`), in the model's own train/eval mode,
    under ``no_grad``, on the model's device (or ``device``).
    ``autocast=True`` runs under ``torch.autocast`` for the device (bfloat16 on cpu,
    float16 on cuda; or pass a dtype): mixed precision is where channels_last pays on GPUs.
    ``mode='fake'`` propagates FakeTensors on ``device`` (default cpu): no weights, no compute,
    so meta-device models audit on any machine and a CPU machine can predict CUDA; every
    layout is then a prediction (torch.fx capture, else torch.export on the fake weights).
    ``train=True`` adds one backward pass (real mode, graph captures) and reports the layout
    of the gradient reaching every node and every parameter; a gradient arriving NCHW at a
    channels_last activation is a ``backward`` finding.
    ``capture``: 'auto' tries torch.fx (checked against eager when ``verify``: a replay of
    the model's Python with leaf module calls answered from the propagation, one eager
    forward where the replay cannot vouch),
    then torch.export, then eager hooks; 'fx', 'export' or 'hooks' forces one.
    ``bandwidth`` (bytes/s) turns bytes into time; by default a transpose copy is timed
    on the device.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> audit(m, torch.randn(1, 3, 16, 16), bandwidth=1e9).summary.findings
    0
    """
    t0 = time.perf_counter()
    module, args, kwargs = _resolve_model(model, example_inputs, example_kwargs)
    if mode not in ("real", "fake", "both"):
        raise UsageError(f"mode {mode!r} is not one of: real, fake, both")
    if mode == "fake":
        return _audit_fake(
            module, args, kwargs, dtype=dtype, device=device, bandwidth=bandwidth, name=name, t0=t0, train=train
        )
    if mode == "both":
        return _audit_both(
            module, args, kwargs, dtype=dtype, device=device, bandwidth=bandwidth, name=name, train=train
        )
    dev = _resolve_device(module, device)
    target_device = dev if dev != model_device(module) else None
    audit_copy = prepare_audit_copy(module, dtype=dtype, device=target_device)
    sample_args, sample_kwargs = prepare_inputs(args, kwargs, dtype=dtype, device=dev)
    t1 = time.perf_counter()
    amp: torch.dtype | None = None
    if autocast is True:
        amp = torch.bfloat16 if dev.type == "cpu" else torch.float16
    elif isinstance(autocast, torch.dtype):
        amp = autocast

    def run(c: AuditCopy) -> Captured:
        return capture_and_propagate(
            c.module,
            sample_args,
            sample_kwargs,
            method=capture,
            verify=verify,
            progress=progress,
            autocast=amp,
            shared=c.shared,
        )

    try:
        captured = run(audit_copy)
    except SharedWeightWrite as e:
        # caught before the write: start again on weights of the audit's own
        audit_copy = prepare_audit_copy(module, dtype=dtype, device=target_device, share_weights=False)
        captured = run(audit_copy)
        captured = dataclasses.replace(captured, notes=(*captured.notes, f"{e}: audited on copies of the weights"))
    records = captured.records
    param_grads: dict[str, Any] = {}
    if train:
        if captured.gm is None:
            raise UsageError("the backward audit (train=True) needs a graph capture (fx or export), not hooks")
        records, param_grads = _with_backward(records, captured.gm, captured.flat_inputs or [])
    t3 = time.perf_counter()
    bw, bw_source = _user_bandwidth(bandwidth), "user"
    if bw is None:
        bw, bw_source = measure_transpose_bandwidth(str(dev)), "measured"
    t4 = time.perf_counter()
    analysis = analyze(records, bandwidth=bw, device=dev.type)
    t5 = time.perf_counter()
    used_dtype = dtype or _first_float_dtype(module) or torch.float32
    meta = AuditMeta(
        model=name or type(module).__name__,
        torch_version=torch.__version__,
        capture=captured.method,
        capture_notes=captured.notes + _param_grad_notes(param_grads),
        mode="real",
        device=str(dev),
        dtype=str(used_dtype).removeprefix("torch."),
        autocast=str(amp).removeprefix("torch.") if amp is not None else None,
        training=module.training,
        inputs=tuple(tensor_meta(a) for a in sample_args if isinstance(a, torch.Tensor)),
        bandwidth=bw,
        bandwidth_source=bw_source,
    )
    timing = {
        "copy_s": t1 - t0,
        "capture_and_propagate_s": t3 - t1,
        "bandwidth_s": t4 - t3,
        "analyze_s": t5 - t4,
        "total_s": t5 - t0,
        "peak_rss_bytes": float(_peak_rss()),
    }
    from .analyze.verdict import decide

    verdict = decide(records, analysis.summary, device=str(dev), dtype=meta.dtype)
    return AuditReport(
        verdict=verdict,
        source=(module, args, kwargs),
        meta=meta,
        nodes=tuple(records),
        findings=analysis.findings,
        fixes=analysis.fixes,
        hotspots=analysis.hotspots,
        regions=analysis.regions,
        summary=analysis.summary,
        timing=timing,
    )


def _first_float_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def incompatible_nodes(
    model: nn.Module | Callable[[], Any], example_inputs: Any = None, **options: Any
) -> list[NodeRecord]:
    """The records of the nodes that leave, break or re-enter channels_last, in graph order.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Softmax(dim=1))
    >>> [r.name for r in incompatible_nodes(m, torch.randn(1, 3, 16, 16), bandwidth=1e9)]
    ['_1']
    """
    return audit(model, example_inputs, **options).incompatible_nodes


def check(
    model: nn.Module | Callable[[], Any],
    example_inputs: Any = None,
    *,
    fail_on: str = "any",
    **options: Any,
) -> AuditReport:
    """Return the report when the model stays channels_last, else raise ChannelsLastError.

    ``fail_on``: 'any' (default; every finding), 'revert' (breaks, reverts and mixed ops),
    'never'. The error lists each offender: module path, op, source line, bytes and hint.

    >>> import torch
    >>> check(torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 16, 16), bandwidth=1e9).summary.findings
    0
    """
    try:
        kinds = FAIL_ON[fail_on]
    except KeyError:
        raise UsageError(f"fail_on={fail_on!r} is not one of: {', '.join(FAIL_ON)}") from None
    report = audit(model, example_inputs, **options)
    offenders = report.findings_of(kinds)
    if offenders:
        lines = [
            f"{report.meta.model} does not stay channels_last: {len(offenders)} offending "
            f"node(s), {fmt_bytes(sum(f.bytes for f in offenders))} moved per forward"
        ]
        lines += [f"  {i}. {offender_line(f)}" for i, f in enumerate(offenders, 1)]
        raise ChannelsLastError("\n".join(lines), offenders=tuple(offenders))
    return report


def repair(
    model: nn.Module | Callable[[], Any],
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    grads: bool = True,
) -> tuple[Any, Any]:
    """A repaired channels_last ``torch.fx.GraphModule`` of ``model`` and its ``RepairLog``.

    Rewrites that remove layout transposes are kept only when the outputs (and gradients)
    still match the original model in float64; the model itself is never modified.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.InstanceNorm2d(8), torch.nn.Conv2d(8, 8, 3))
    >>> gm, log = repair(m, torch.randn(1, 3, 16, 16))
    >>> [s.kind for s in log.steps], log.bytes_after
    (['instancenorm->groupnorm'], 0)
    """
    from .fix.rewrite import repair_model

    module, args, kwargs = _resolve_model(model, example_inputs, example_kwargs)
    return repair_model(module, args, kwargs, grads=grads)


_ASSUMED_BANDWIDTH = {"cuda": 2.0e12, "cpu": 1.0e10, "mps": 2.0e11}


def _audit_fake(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    bandwidth: float | None,
    name: str | None,
    t0: float,
    train: bool = False,
) -> AuditReport:
    from .analyze.findings import analyze
    from .analyze.verdict import decide
    from .capture.fx import export as export_capture
    from .capture.fx import trace
    from .errors import TraceError
    from .prepare.fake import divergence_warnings, fake_copy, fake_inputs, fake_mode
    from .propagate.interpreter import propagate

    dev = torch.device(device) if device is not None else torch.device("cpu")
    fmode = fake_mode()
    copy = fake_copy(module, fmode, dev, dtype)
    sample_args, sample_kwargs = fake_inputs(args, kwargs, fmode, dev, dtype)
    notes: list[str] = []
    try:
        captured = trace(copy)
        flat = False
    except TraceError as e:
        # torch.export reuses the fake mode of the fake weights and inputs: still no real memory
        notes.append(f"fx: {e}")
        captured = export_capture(copy, sample_args, sample_kwargs)
        flat = True
    with fmode:
        records, _ = propagate(
            captured.root, sample_args, sample_kwargs, graph=captured.graph, record_hidden=False, flat_inputs=flat
        )
        param_grads: dict[str, Any] = {}
        if train:
            from .propagate.interpreter import _positional

            values = (
                list(tree_leaves((sample_args, sample_kwargs)))
                if flat
                else _positional(captured.graph, sample_args, sample_kwargs)
            )
            records, param_grads = _with_backward(records, captured.gm, values)
    bw, source = _user_bandwidth(bandwidth), "user"
    if bw is None:
        bw, source = _ASSUMED_BANDWIDTH.get(dev.type, 1.0e10), "assumed"
    analysis = analyze(records, bandwidth=bw, device=dev.type)
    ops = {r.op_name.lower() for r in records} | {r.module_type.lower() for r in records if r.op == "call_module"}
    used_dtype = dtype or _first_float_dtype(module) or torch.float32
    meta = AuditMeta(
        model=name or type(module).__name__,
        torch_version=torch.__version__,
        capture=captured.method,
        capture_notes=tuple(notes)
        + tuple(f"prediction: {w}" for w in divergence_warnings(ops, str(dev)))
        + _param_grad_notes(param_grads),
        mode="fake",
        device=str(dev),
        dtype=str(used_dtype).removeprefix("torch."),
        autocast=None,
        training=module.training,
        inputs=tuple(tensor_meta(a) for a in sample_args if isinstance(a, torch.Tensor)),
        bandwidth=bw,
        bandwidth_source=source,
    )
    verdict = decide(records, analysis.summary, device=str(dev), dtype=meta.dtype)
    return AuditReport(
        meta=meta,
        nodes=tuple(records),
        findings=analysis.findings,
        fixes=analysis.fixes,
        hotspots=analysis.hotspots,
        regions=analysis.regions,
        summary=analysis.summary,
        timing={"total_s": time.perf_counter() - t0, "peak_rss_bytes": float(_peak_rss())},
        verdict=verdict,
        source=None,
    )


def _peak_rss() -> int:
    """High-water mark of this process's resident memory, in bytes (0 where unknown)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return 0


def _user_bandwidth(bandwidth: float | None) -> float | None:
    """The caller's bandwidth in bytes/s, checked (None when not given)."""
    if bandwidth is None:
        return None
    if bandwidth <= 0:
        raise UsageError(f"bandwidth must be positive bytes/s, got {bandwidth}")
    return float(bandwidth)


def _with_backward(
    records: list[NodeRecord], gm: torch.fx.GraphModule, values: list[Any]
) -> tuple[list[NodeRecord], dict[str, Any]]:
    """``records`` with the gradient layouts of one backward pass of ``gm`` on ``values``
    (its placeholders' inputs), and the parameter gradients' layouts."""
    from .propagate.backward import backward_layouts

    grads, param_grads = backward_layouts(gm, values)
    return [dataclasses.replace(r, grads=grads.get(r.name, ())) for r in records], param_grads


def _param_grad_notes(param_grads: dict[str, Any]) -> tuple[str, ...]:
    """One note naming 4D/5D parameter gradients the ops produced in NCHW (a leaf's .grad is
    forced to the parameter's strides, so this is the layout the backward kernel chose)."""
    from .records import Layout

    nchw = sorted(n for n, m in param_grads.items() if m.is_spatial and m.layout is Layout.CONTIGUOUS)
    if not param_grads:
        return ()
    spatial = sum(1 for m in param_grads.values() if m.is_spatial)
    if not nchw:
        return (f"backward: all {spatial} 4D/5D parameter gradients produced channels_last or ambiguous",)
    return (f"backward: {len(nchw)} of {spatial} 4D/5D parameter gradients produced NCHW: {', '.join(nchw[:8])}",)


def _audit_both(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    bandwidth: float | None,
    name: str | None,
    train: bool,
) -> AuditReport:
    """Real and fake on the same graph; every node where they disagree is a divergence."""

    from .prepare.fake import divergences

    real = audit(
        module,
        args,
        example_kwargs=kwargs,
        dtype=dtype,
        device=device,
        bandwidth=bandwidth,
        name=name,
        capture="fx",
        train=train,
    )
    fake = audit(
        module,
        args,
        example_kwargs=kwargs,
        dtype=dtype,
        device=real.meta.device,
        bandwidth=real.meta.bandwidth,
        name=name,
        mode="fake",
    )
    extra = divergences(real.nodes, fake.nodes, real.meta.device)
    findings = tuple(sorted(real.findings + tuple(extra), key=lambda f: f.index))
    summary = dataclasses.replace(real.summary, divergences=len(extra))
    meta = dataclasses.replace(real.meta, mode="both")
    return dataclasses.replace(real, meta=meta, findings=findings, summary=summary)
