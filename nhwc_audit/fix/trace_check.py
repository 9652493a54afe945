"""The repair's check that torch.fx's trace of the converted model computes what the model computes
(:func:`check_trace`): a trace takes a branch fx cannot see one way, whatever eager does."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import ConversionError, first_line
from ..propagate.compare import first_difference
from ..propagate.runner import quiet
from .runs import fresh_copy, outputs

__all__ = ["check_trace"]


def _run(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[torch.Tensor] | None, str]:
    """``m``'s outputs on the sample, or None and the first line of what it raised (off stderr)."""
    try:
        with quiet():
            return outputs(fresh_copy(m), args, kwargs, grads=False)[0], ""
    except Exception as e:
        return None, first_line(e)


def check_trace(converted: nn.Module, gm: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise :class:`ConversionError` unless ``gm``, torch.fx's trace of ``converted``, does what
    ``converted`` does on the sample (the same weights, input and kernels): the same outputs, or the
    same error (a view that breaks on channels_last, which the repair is for). A trace takes a
    branch fx cannot see (``torch.jit.isinstance``, a Python value) one way, whatever eager does."""
    (got, raised), (ref, eager_raised) = _run(gm, args, kwargs), _run(converted, args, kwargs)
    name = type(converted).__name__
    why = (
        "the trace took a branch of forward the other way (a test fx cannot see: torch.jit.isinstance, a "
        "Python value), or forward updates a buffer in place, which torch.fx runs once while tracing; make that "
        "code traceable, or repair a submodule that traces"
    )
    if got is None and raised != eager_raised:
        raise ConversionError(
            f"repair needs a torch.fx trace that runs as the model does; torch.fx's graph of {name} fails where "
            f"the model {'raises otherwise' if eager_raised else 'runs'} ({raised}): {why}"
        )
    diff = "it runs where the model raises" if ref is None and got is not None else None
    if got is not None and ref is not None:
        diff = first_difference(got, ref)
    if diff is not None:
        raise ConversionError(
            f"repair needs a torch.fx trace that computes what the model computes; torch.fx's graph of {name} does "
            f"not ({diff}): {why}"
        )
