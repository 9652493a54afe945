"""Breaks during the propagation: a node that raises on channels_last input is run again on
NCHW copies (:func:`retry_nchw`: the error is the model's own when that fails too), and a view
of an NCHW activation is tried on a channels_last one (:func:`latent_error`: the break that
fixing the revert upstream would expose). A node autograd alone refuses is not a break
(:func:`without_grad_if_refused`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_map

from ..capture.context import AUTOCAST_KEY, NO_GRAD_KEY, NodeContext
from ..errors import PropagationError, first_line, model_advice
from ..layout import tensor_meta
from ..prepare.copy import memory_format_for_rank
from ..records import Layout, NodeInput, in_place_name
from ..tensors import to_nchw
from .dispatch import is_alias_of
from .runner import fake_limitation

__all__ = [
    "Call",
    "as_traced",
    "autocast_in",
    "latent_error",
    "retry_nchw",
    "to_channels_last",
    "without_grad_if_refused",
]

Call = Callable[[torch.fx.Node, tuple[Any, ...], dict[str, Any]], Any]
"""Runs a node on given argument values (the interpreter's own call)."""

Inputs = list[tuple[NodeInput, torch.Tensor]]


def as_traced(call: Call, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], *, grad: bool) -> Any:
    """``call(n, args, kwargs)`` inside the ``torch.autocast`` blocks of forward fx traced ``n`` in
    (:data:`~nhwc_audit.capture.context.AUTOCAST_KEY`: a head kept in float32 runs in float32 in an
    autocast audit, as in eager; CUDA's blocks on a machine without CUDA are left out, as eager's
    do nothing there); with ``grad``, through :func:`without_grad_if_refused`."""
    blocks = n.meta.get(AUTOCAST_KEY)
    if not blocks:
        return without_grad_if_refused(call, n, args, kwargs) if grad else call(n, args, kwargs)
    with contextlib.ExitStack() as stack:
        for device, dtype, enabled, cache in _entered(blocks):
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache))
        return without_grad_if_refused(call, n, args, kwargs) if grad else call(n, args, kwargs)


def _entered(blocks: Any) -> list[Any]:
    """The autocast blocks (device, dtype, enabled, cache) a node's run enters: CUDA's on a machine
    without CUDA do nothing in eager and are left out."""
    return [b for b in blocks if b[0] != "cuda" or torch.cuda.is_available()]


def autocast_in(n: torch.fx.Node, device: str, run: dict[str, bool | None] | None = None) -> str | None:
    """``device`` where ``n`` ran under its autocast (the audit's, or the blocks of forward's own
    that :func:`as_traced` enters), else None (a tensor on the meta device: no autocast there).
    ``run``: the audit's own autocast per device, asked once per run (no node changes it: forward's
    blocks are entered around the nodes traced in them)."""
    run = {} if run is None else run
    if device not in run:
        run[device] = torch.is_autocast_enabled(device) if torch.amp.is_autocast_available(device) else None
    on = run[device]
    if on is None:
        return None
    for block, _, enabled, _ in _entered(n.meta.get(AUTOCAST_KEY, ())):
        if block == device:
            on = enabled
    return device if on else None


def without_grad_if_refused(call: Call, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``call(n, args, kwargs)`` (a train audit's, with autograd), run again without autograd
    where autograd alone refuses it: an in-place write to a leaf that requires grad, made under
    ``torch.no_grad()`` in the model's forward, a block fx does not trace. Not a break: the run
    goes on as the model's does; the error stays when the node fails without autograd too. A node
    fx traced inside such a block (:data:`~nhwc_audit.capture.context.NO_GRAD_KEY`) runs without
    autograd, as eager runs it: no backward goes through it. (A call, not a wrapper an interpreter
    keeps: a wrapper of its own bound method is a reference cycle, which holds the run's records
    until the cyclic collector comes.)"""
    if n.meta.get(NO_GRAD_KEY):
        with torch.no_grad():
            return call(n, args, kwargs)
    try:
        return call(n, args, kwargs)
    except Exception as e:
        try:
            with torch.no_grad():
                return call(n, args, kwargs)
        except Exception:
            raise e from None


def retry_nchw(
    call: Call,
    n: torch.fx.Node,
    ctx: NodeContext,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    inputs: Inputs,
    error: Exception,
) -> Any:
    """The result of node ``n`` on NCHW copies of its arguments, after ``error`` on the
    channels_last ones; :class:`PropagationError` naming the node when it is the model's own
    error (no channels_last input, or NCHW fails too)."""
    where = f"node {n.name!r} ({ctx.op_name}"
    where += f" in {ctx.module_path} ({ctx.module_type})" if ctx.module_path else ""
    where += f", {ctx.source})" if ctx.source else ")"
    has_cl = any(i.meta.layout in (Layout.CHANNELS_LAST, Layout.STRIDED) for i, _ in inputs if i.meta.is_spatial)
    shapes = ", ".join(i.meta.shape_str for i, _ in inputs if not i.is_param) or "none"

    def model_error(how: str) -> PropagationError:
        if fake_limitation(error):
            return PropagationError(
                f"{where} cannot run on fake tensors: {first_line(error)}: fake mode cannot audit this "
                "op (it needs tensor values, or fake tensors do not support it); audit in real mode (--mode real)",
                node=n.name,
                node_format=n.format_node(),
            )
        return PropagationError(
            f"{where} raised {first_line(error)} ({how}; node inputs {shapes}): the model's own error at "
            f"the audited shapes, not a channels_last problem; {model_advice(error)}",
            node=n.name,
            node_format=n.format_node(),
        )

    if n.op in ("placeholder", "output", "get_attr") or not has_cl:
        raise model_error("its inputs are as NCHW lays them out: none is channels_last only") from error
    try:  # still under the run's recorder when there are shared weights to guard
        return call(n, tree_map(to_nchw, args), tree_map(to_nchw, kwargs))
    except Exception as e2:
        again = "on NCHW input too" if str(e2) == str(error) else f"and {first_line(e2)} on NCHW input"
        raise model_error(again) from error


def to_channels_last(v: Any) -> Any:
    """An NCHW 4D/5D tensor as a channels_last(_3d) copy (to re-run a view of it, a latent
    break; a gradient handed back as eager's kernel gives it); other values as they are."""
    fmt = memory_format_for_rank(v.dim()) if isinstance(v, torch.Tensor) else None
    if fmt is not None and tensor_meta(v).layout is Layout.CONTIGUOUS:
        return v.contiguous(memory_format=fmt)
    return v


def latent_error(
    call: Call,
    n: torch.fx.Node,
    op_name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    inputs: Inputs,
    result: Any,
) -> str | None:
    """For a view of an NCHW activation: the error it raises when that activation is
    channels_last (a break that fixing the revert upstream would expose), else None.
    Views cost nothing to re-run; in-place ops are not views and are never re-run."""
    if n.op not in ("call_function", "call_method") or not isinstance(result, torch.Tensor):
        return None
    if in_place_name(op_name):
        return None
    if not any(
        not i.is_param and i.meta.is_spatial and i.meta.layout is Layout.CONTIGUOUS and is_alias_of(result, t)
        for i, t in inputs
    ):
        return None

    try:
        call(n, tree_map(to_channels_last, args), tree_map(to_channels_last, kwargs))
    except Exception as e:
        return first_line(e)
    return None
