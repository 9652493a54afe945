"""The Python API: ``audit``, ``check``, ``incompatible_nodes``, ``repair``, and the steps a
report can take after the audit (``repair_report``, ``measure_report``).

Turns the caller's arguments into a model, a sample and :class:`~nhwc_audit.pipeline.AuditOptions`
(the one place they are checked), then runs :func:`~nhwc_audit.pipeline.run_audit`. Prints nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, cast, get_args

import torch
from torch import nn

from .errors import UsageError
from .fix.repair import RepairLog
from .followups import measure_report, repair_report
from .pipeline import AuditOptions, run_audit
from .prepare.copy import made_inputs, model_device, refuse_meta
from .prepare.load import call_build_fn, split_example, usable_bandwidth
from .prepare.wrappers import unwrapped
from .propagate.chain import CAPTURES
from .propagate.interpreter import ProgressFn
from .records import FAIL_ON, CaptureMethod, FailOn, FindingKind, Mode, NodeRecord
from .result import AuditReport, channels_last_error

__all__ = [
    "DEFAULT_INPUT_SHAPE",
    "FAIL_ON",
    "AuditReport",
    "audit",
    "check",
    "default_input_shape",
    "fail_on_kinds",
    "incompatible_nodes",
    "measure_report",
    "repair",
    "repair_report",
]

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)

_MODES: tuple[Mode, ...] = get_args(Mode)


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
        model, built_args, built_kwargs = split_example(
            call_build_fn(model, getattr(model, "__name__", "build_fn")), "build_fn"
        )
    if example_inputs is None:
        args = built_args
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise UsageError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    kwargs = {**built_kwargs, **(example_kwargs or {})}
    if args is None and _first_parameter(model) in kwargs:
        args = ()  # the keyword arguments name forward's first input (forward(x=..., mask=...))
    if args is None:
        args = made_inputs([default_input_shape(model)], model)
    return model, args, kwargs


def _first_parameter(model: nn.Module) -> str | None:
    """The name of ``model.forward``'s first parameter, None when it has none or cannot tell."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[0].name if params and params[0].kind is not inspect.Parameter.VAR_POSITIONAL else None


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The sample an audit uses when none is given: one image for the model's first 2D
    convolution (``1 x in_channels x 224 x 224``) or one clip for its first 3D one
    (``1 x in_channels x 16 x 112 x 112``, the video models' training clip); 1x3x224x224 when it
    has no convolution. Give the training shape for anything else.

    >>> default_input_shape(nn.Sequential(nn.Conv3d(1, 8, 3)))
    (1, 1, 16, 112, 112)
    """
    conv = first_conv(model)
    if conv is None:
        return DEFAULT_INPUT_SHAPE
    return (1, conv.in_channels, 16, 112, 112) if first_conv_rank(conv) == 5 else (1, conv.in_channels, 224, 224)


def first_conv(model: nn.Module) -> nn.Conv2d | nn.ConvTranspose2d | nn.Conv3d | nn.ConvTranspose3d | None:
    """The model's first 2D or 3D convolution (in module order), which decides its input's rank."""
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Conv3d, nn.ConvTranspose3d)
    return next((m for m in model.modules() if isinstance(m, kinds)), None)


def first_conv_rank(conv: nn.Module) -> int:
    """The rank of the input ``conv`` (a :func:`first_conv`) takes, from its class: its weight is not
    read, which for a parametrized one runs the parametrization (spectral_norm's writes in place)."""
    return 5 if isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)) else 4


def _resolve_device(model: nn.Module, device: str | torch.device | None, mode: Mode) -> torch.device:
    if device is None:  # fake audits predict; the model may live on the meta device
        return torch.device("cpu") if mode == "fake" else model_device(model)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {str(device)!r} is not a torch device: use cpu, cuda, cuda:N or mps") from e
    if dev.type == "meta":
        raise UsageError(
            "device 'meta' is not a device to audit on: meta tensors run no kernels, so their layouts are "
            "not what any device computes (every convolution comes out NCHW); a meta-device model is audited "
            "in fake mode (--mode fake, API mode='fake') on the device it predicts: --device cpu or cuda"
        )
    if mode != "fake" and dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "device 'cuda' is not available on this machine: audit on cpu, or predict cuda in fake mode "
            "(--mode fake, API mode='fake')"
        )
    if mode != "fake" and dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' is not available on this machine: audit on cpu")
    return dev


def _options(
    module: nn.Module,
    *,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    bandwidth: float | None,
    name: str | None,
    capture: str,
    verify: bool,
    autocast: bool | torch.dtype,
    mode: str,
    train: bool,
    progress: ProgressFn | None,
    threads: int | None,
) -> AuditOptions:
    if mode not in _MODES:
        raise UsageError(f"mode {mode!r} is not one of: {', '.join(_MODES)}")
    if capture not in CAPTURES:
        raise UsageError(f"capture {capture!r} is not one of: {', '.join(CAPTURES)}")
    if bandwidth is not None and not usable_bandwidth(bandwidth):
        raise UsageError(f"bandwidth must be a positive, finite number of bytes/s (e.g. 1e10), got {bandwidth!r}")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UsageError(f"dtype must be a floating torch.dtype (torch.float16, torch.bfloat16, ...), got {dtype!r}")
    dev = _resolve_device(module, device, mode)
    amp: torch.dtype | None = None
    if autocast is True:
        amp = torch.bfloat16 if dev.type == "cpu" else torch.float16
    elif isinstance(autocast, torch.dtype):
        amp = autocast
    return AuditOptions(
        device=dev,
        dtype=dtype,
        bandwidth=float(bandwidth) if bandwidth is not None else None,
        name=name,
        capture=capture,
        verify=verify,
        autocast=amp,
        mode=mode,
        train=train,
        progress=progress,
        threads=threads,
    )


def audit(
    model: nn.Module | Callable[[], Any],
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    bandwidth: float | None = None,
    name: str | None = None,
    capture: CaptureMethod = "auto",
    verify: bool = True,
    autocast: bool | torch.dtype = False,
    mode: Mode = "real",
    train: bool = False,
    progress: ProgressFn | None = None,
    threads: int | None = None,
) -> AuditReport:
    """Audit ``model`` on a channels_last copy of ``example_inputs``.

    ``model`` is an nn.Module or a build function returning one (or ``(module, args)``,
    ``(module, args, kwargs)``). Inputs default to one image (or clip) for the model's first
    convolution (:func:`default_input_shape`: ``1x3x224x224`` for an RGB 2D model). The model
    and the inputs are never modified: the audit runs a channels_last copy (weights read in
    place with channels_last strides, not copied: see
    :func:`~nhwc_audit.prepare.copy.prepare_audit_copy`), in the model's own train/eval mode,
    under ``no_grad`` (with autograd for ``train=True``, as training runs it), on the model's
    device (or ``device``).
    ``autocast=True`` runs under ``torch.autocast`` for the device (bfloat16 on cpu,
    float16 on cuda; or pass a dtype): mixed precision is where channels_last pays on GPUs.
    ``mode='fake'`` propagates FakeTensors on ``device`` (default cpu): no weights, no compute,
    so meta-device models audit on any machine and a CPU machine can predict CUDA; every
    layout is then a prediction. ``mode='both'`` runs both on the same capture and reports
    every node where they disagree.
    ``train=True`` runs the forward with autograd and adds one backward pass from it (graph
    captures) and reports the layout of the gradient reaching every node and every parameter; a
    gradient arriving NCHW at a channels_last activation is a ``backward`` finding.
    ``capture``: 'auto' tries torch.fx (checked against eager when ``verify``, in real mode: a
    replay of the model's Python with leaf module calls answered from the propagation, one
    eager forward where the replay cannot vouch), then torch.export, then an eager run
    recorded at the dispatch level ('hooks'); 'fx', 'export' or 'hooks' forces one.
    ``threads``: CPU threads to audit with (CPU Conv3d picks NCDHW or channels_last_3d by shape
    and thread count; audit at your training configuration); every report records them.
    ``bandwidth`` (bytes/s) turns bytes into time; by default a transpose copy is timed
    on the device (fake mode assumes a typical figure for the device type).

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> audit(m, torch.randn(1, 3, 16, 16), bandwidth=1e9).summary.findings
    0
    """
    module, args, kwargs = _resolve_model(model, example_inputs, example_kwargs)
    options = _options(
        module,
        dtype=dtype,
        device=device,
        bandwidth=bandwidth,
        name=name,
        capture=capture,
        verify=verify,
        autocast=autocast,
        mode=mode,
        train=train,
        progress=progress,
        threads=threads,
    )
    return run_audit(module, args, kwargs, options)


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
    fail_on: FailOn = "any",
    **options: Any,
) -> AuditReport:
    """Return the report when the model stays channels_last, else raise ChannelsLastError.

    ``fail_on``: 'any' (default; every finding), 'revert' (breaks, reverts and mixed ops),
    'never'. The error lists each offender: module path, op, source line, bytes and hint.

    >>> import torch
    >>> check(torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 16, 16), bandwidth=1e9).summary.findings
    0
    """
    kinds = fail_on_kinds(fail_on)
    report = audit(model, example_inputs, **options)
    offenders = report.offenders(kinds)
    if offenders:
        raise channels_last_error(report, offenders)
    return report


def fail_on_kinds(fail_on: FailOn) -> frozenset[FindingKind]:
    """The finding kinds ``fail_on`` counts, or a :class:`UsageError` naming the choices (a typo,
    or None, reaches here from untyped callers)."""
    try:
        return FAIL_ON[fail_on]
    except (KeyError, TypeError):
        raise UsageError(f"fail_on={fail_on!r} is not one of: {', '.join(FAIL_ON)}") from None


def repair(
    model: nn.Module | Callable[[], Any],
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    grads: bool = True,
) -> tuple[nn.Module, RepairLog]:
    """A repaired channels_last ``torch.fx.GraphModule`` of ``model`` and its ``RepairLog``.

    Rewrites that remove layout transposes are kept only when the outputs (and gradients) still match the
    original in float64; the model is never modified. ``audit(model, x).repaired()``'s graph and log, by the
    bytes channels_last adds over NCHW (a model fx cannot trace whole: its own class, parts repaired).

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.InstanceNorm2d(8), torch.nn.Conv2d(8, 8, 3))
    >>> gm, log = repair(m, torch.randn(1, 3, 16, 16))
    >>> [s.kind for s in log.steps], log.bytes_after
    (['instancenorm->groupnorm'], 0)
    """
    module, args, kwargs = _resolve_model(model, example_inputs, example_kwargs)
    module = unwrapped(module)[0]  # (a graph of what torch.compile or DataParallel wraps)
    refuse_meta(module, "a repair runs the model and checks its results: build it on cpu/cuda")
    report = repair_report(run_audit(module, args, kwargs, AuditOptions(device=model_device(module))), grads=grads)
    return report.repaired_module, cast(RepairLog, report.repair)
