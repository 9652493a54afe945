"""Conversion to channels_last: the user's ``convert()``, and the audit's private copy.

``module.to(memory_format=torch.channels_last)`` raises on any 5D parameter (Conv3d), so
both convert parameter by parameter, by rank: 4D -> channels_last, 5D -> channels_last_3d,
others unchanged. Conversion uses ``Tensor.to(memory_format=...)`` exactly like
``Module.to``: that call restrides 1x1 and depthwise weights (which ``.contiguous(...)``
would leave alone), and those strides decide a conv's output layout.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError, UsageError
from ..tensors import SharedStorages, is_plain_dense
from .clone import ATOMIC_TYPES, MODULE_TABLES, clone_modules

__all__ = [
    "AuditCopy",
    "audit_param",
    "convert",
    "first_float_dtype",
    "made_inputs",
    "memory_format_for_rank",
    "plain_tensors",
    "model_device",
    "model_tensors",
    "own_dtype_name",
    "prepare_audit_copy",
    "prepare_inputs",
    "refuse_inference",
    "refuse_meta",
]


def memory_format_for_rank(rank: int) -> torch.memory_format | None:
    """channels_last for 4D, channels_last_3d for 5D, None for other ranks."""
    if rank == 4:
        return torch.channels_last
    if rank == 5:
        return torch.channels_last_3d
    return None


def _converted(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | None) -> torch.Tensor:
    fmt = memory_format_for_rank(t.dim())
    target_dtype = dtype if (dtype is not None and t.is_floating_point()) else None
    kwargs: dict[str, Any] = {}
    if target_dtype is not None:
        kwargs["dtype"] = target_dtype
    if device is not None:
        kwargs["device"] = device
    if fmt is not None:
        kwargs["memory_format"] = fmt
    return t.to(**kwargs) if kwargs else t


def model_tensors(
    model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None
) -> Iterable[tuple[str, torch.Tensor, bool]]:
    """``named_parameters()`` then ``named_buffers()`` (each tensor once), with the flag
    is-a-parameter; ``modules``: ``list(model.named_modules())`` when the caller has it (each
    of those calls walks the module tree again)."""
    walk = modules if modules is not None else list(model.named_modules())
    seen: set[int] = set()
    for table, is_param in (("_parameters", True), ("_buffers", False)):
        for path, m in walk:
            # (a traced TorchScript module's tables are properties, not in its __dict__)
            for name, t in (vars(m).get(table) or getattr(m, table, {})).items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield (f"{path}.{name}" if path else name), t, is_param


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (cpu for a stateless model). Lazily:
    it stops at the first one (a full walk of densenet121's 434 modules costs ~1 ms, and every
    audit asks twice)."""
    for ts in (model.parameters(), model.buffers()):
        for t in ts:
            return t.device
    return torch.device("cpu")


def first_float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (None when it has none): the
    dtype a run without ``dtype=`` audits in."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def made_inputs(shapes: Iterable[tuple[int, ...]], model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Inputs made from shapes alone (``--input``, or none given): random normal from a generator
    seeded 0, in the model's own dtype (a half model gets half images, float32 without one)."""
    g = torch.Generator().manual_seed(0)
    dtype = first_float_dtype(model) or torch.float32
    return tuple(torch.randn(s, generator=g).to(dtype) for s in shapes)


def own_dtype_name(model: nn.Module) -> str:
    """The name of the dtype ``model`` runs in (``"float32"``): its first floating-point
    parameter's, float32 without one."""
    return str(first_float_dtype(model) or torch.float32).removeprefix("torch.")


def convert(model: nn.Module) -> nn.Module:
    """Return a channels_last copy of ``model`` (channels_last_3d for 5D weights).

    The copy is independent: training it never touches ``model``.

    >>> import torch
    >>> m = convert(torch.nn.Conv3d(2, 4, 3))
    >>> m.weight.is_contiguous(memory_format=torch.channels_last_3d)
    True
    """
    try:
        new = copy.deepcopy(model)
    except Exception as e:
        raise ConversionError(
            f"cannot copy {type(model).__name__} ({type(e).__name__}: {e}); "
            "nhwc-audit never converts your model in place"
        ) from e
    with torch.no_grad():
        for _, t, _ in model_tensors(new):
            fmt = memory_format_for_rank(t.dim())
            if fmt is not None:
                t.data = t.data.to(memory_format=fmt)
    return new


def _restrided(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor | None:
    """``t`` with the strides ``t.to(memory_format=fmt)`` gives it (worked out on the meta
    device, so 1x1 and depthwise weights are restrided exactly as ``.to`` does), over ``t``'s
    own storage: no copy, the values come out permuted. ``t`` itself when ``.to`` keeps its
    strides; None unless ``t`` is dense in NCHW or channels_last order (else a view of its
    storage may not cover the new strides)."""
    strides = _strides_to(tuple(t.shape), t.stride(), t.dtype, fmt)
    if strides == t.stride():
        return t
    if not (t.is_contiguous() or t.is_contiguous(memory_format=fmt)):
        return None
    return torch.as_strided(t, t.shape, strides, t.storage_offset())


@functools.lru_cache(maxsize=1024)
def _strides_to(
    shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype, fmt: torch.memory_format
) -> tuple[int, ...]:
    """The strides ``.to(memory_format=fmt)`` gives a tensor of these (a pure function of them,
    asked once per weight shape: models repeat a few)."""
    return tuple(torch.empty_strided(shape, strides, dtype=dtype, device="meta").to(memory_format=fmt).stride())


def audit_param(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | None) -> tuple[torch.Tensor, bool]:
    """A parameter's tensor for the audit and whether it shares the user's storage.

    Same dtype and device: 4D/5D weights are *restrided* to what ``.to(memory_format=...)``
    gives (same storage, values permuted: kernels choose layouts from strides, shapes and
    dtypes, never from values); the rest are the user's tensors as they are. Any other
    dtype or device: a converted copy."""
    fmt = memory_format_for_rank(t.dim())
    changes_dtype = dtype is not None and t.is_floating_point() and t.dtype != dtype
    if changes_dtype or (device is not None and t.device != device):
        return _converted(t, dtype, device), False
    if fmt is None:
        return t, True
    view = None
    if is_plain_dense(t):
        view = _restrided(t, fmt)  # plain dense tensors only: others keep .to()'s own copy
    return (view, True) if view is not None else (t.to(memory_format=fmt), False)


_CONTAINERS = (dict, OrderedDict, list, tuple, set)


def plain_tensors(
    model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Tensors the model keeps as plain module attributes (not parameters or buffers), directly
    or in a list, tuple or dict: Ultralytics' ``Detect.stride``, cached anchors. Module.to()
    leaves them alone unless the model's own ``_apply`` moves them; the audit's copies must
    still never share them (a fake copy needs fake ones)."""
    out: list[tuple[str, torch.Tensor]] = []
    for path, m in modules if modules is not None else model.named_modules():
        for key, value in vars(m).items():
            kind = type(value)
            if kind in ATOMIC_TYPES or key in MODULE_TABLES or (kind in _CONTAINERS and not value):
                continue  # most attributes (numbers, empty hook tables): skipped cheaply
            items = (
                value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            )
            for t in items:
                if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                    out.append((f"{path}.{key}" if path else key, t))
    return out


@dataclass(frozen=True)
class AuditCopy:
    """The audit's private channels_last model and the storages it shares with the user's."""

    module: nn.Module
    shared: SharedStorages
    """``untyped_storage().data_ptr()`` of every user parameter the copy reads in place, with
    the bytes each spans: the propagation refuses to write to them, or to a tensor made over
    their memory (:class:`~nhwc_audit.errors.SharedWeightWrite`)."""

    @property
    def permuted(self) -> bool:
        """Some parameter is restrided over the user's storage: its values come out permuted, so
        the copy's outputs are not the model's (layouts are; shapes too unless they depend on
        values: :func:`~nhwc_audit.propagate.captured.value_dependent`)."""
        return self.shared.permuted


def refuse_meta(model: nn.Module, why: str, tensors: Any = None) -> None:
    """Raise :class:`ConversionError` (``why``: what to do) when ``model`` holds a tensor on the
    meta device (``tensors``: :func:`model_tensors` of it, when the caller has them)."""
    for name, t, _ in tensors if tensors is not None else model_tensors(model):
        if t.device.type == "meta":
            raise ConversionError(f"{type(model).__name__} has tensors on the meta device (e.g. {name!r}); {why}")


def refuse_inference(model: nn.Module, train: bool) -> None:
    """Raise :class:`UsageError` for a train audit of a model whose parameters are inference tensors
    (made under ``torch.inference_mode()``): autograd trains none of them, in eager either."""
    if train and any(p.is_inference() for p in model.parameters()):
        raise UsageError(
            "the model's parameters were made under torch.inference_mode(), and autograd cannot train them "
            "(eager training fails the same way): build the model outside inference_mode for a train audit"
        )


def prepare_audit_copy(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    share_weights: bool = True,
) -> AuditCopy:
    """A channels_last copy for auditing that does not pay for the weights.

    The audit needs the weights' layouts, not their values: with ``share_weights``,
    parameters keep the user's storage (4D/5D ones restrided to channels_last, see
    :func:`audit_param`) and nothing is copied; without it (the fallback for models that
    write to their own weights in forward) spatial parameters are converted copies as
    :func:`convert` makes them. Buffers are always copied, so BatchNorm running statistics
    in train mode never reach the user's model. The module tree is rebuilt
    (:func:`clone_modules`), so setting attributes on the copy never touches ``model``.
    """
    modules = list(model.named_modules())
    tensors = list(model_tensors(model, modules))
    refuse_meta(
        model,
        "a real-mode audit needs real weights: build the model on cpu/cuda, or audit it with "
        "--mode fake (API: mode='fake')",
        tensors,
    )
    memo: dict[int, Any] = {}
    shared: dict[int, int] = {}
    permuted = False
    with torch.no_grad():
        for _, t, is_param in tensors:
            if is_param and share_weights:
                new, shares = audit_param(t.detach(), dtype, device)
            else:
                new, shares = _converted(t.detach(), dtype, device), False
                if _same_storage(new, t):
                    new = new.clone()  # buffers are updated in place (BatchNorm stats)
            if shares:
                permuted = permuted or new.stride() != t.stride()
                storage = t.untyped_storage()
                shared[storage.data_ptr()] = storage.data_ptr() + storage.nbytes()
            # (a parameter made under torch.inference_mode takes no gradient outside it: none is asked)
            memo[id(t)] = (
                nn.Parameter(new, requires_grad=t.requires_grad and not new.is_inference()) if is_param else new
            )
        for _, t in plain_tensors(model, modules):  # copied (and moved with the model), layout and dtype as they are
            if id(t) not in memo:
                memo[id(t)] = t.detach().to(device=device, copy=True) if device is not None else t.detach().clone()
    try:
        return AuditCopy(clone_modules(model, memo), SharedStorages(shared.items(), permuted))
    except Exception as e:
        raise ConversionError(
            f"cannot copy {type(model).__name__} for the audit ({type(e).__name__}: {e}); "
            "nhwc-audit never converts your model in place"
        ) from e


def prepare_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, dtype: torch.dtype | None, device: torch.device
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Copy the sample: 4D/5D tensors to channels_last(_3d), others unchanged but copied."""

    def conv(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if v.device.type == "meta":
            raise UsageError("example inputs are on the meta device: a real-mode audit needs real tensors")
        fmt = memory_format_for_rank(v.dim()) or torch.preserve_format
        target_dtype = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        out = v.detach().to(device=device, dtype=target_dtype)
        return out.clone(memory_format=fmt)

    from torch.utils._pytree import tree_map

    return tuple(tree_map(conv, a) for a in args), {k: tree_map(conv, v) for k, v in kwargs.items()}
