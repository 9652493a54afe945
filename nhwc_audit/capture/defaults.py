"""forward's parameters the sample leaves at their defaults, traced as those defaults.

torch.fx makes a placeholder of every parameter of forward: one the sample does not give
(``forward(self, x, mask=None)`` called with ``x``) is a proxy while traced, so ``if mask is not
None:`` takes the branch the call does not, and the graph fails its check against eager
("'Tensor' * 'NoneType'"); ``if flag:`` on a default ``flag=True`` stops the trace. Either way the
audit fell back to the eager recording, and a repair, which needs a graph, had none. Such
parameters are traced as their defaults (torch.fx's ``concrete_args``: the graph asserts the value
it was traced with)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .fx import Capture, trace

__all__ = ["defaults_left", "trace_as_called"]

_PLAIN = (type(None), bool, int, float, str)


def defaults_left(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model.forward``'s parameters with a plain default (None, a bool, a number, a string) that
    ``args`` and ``kwargs`` do not give, by name, with their defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # (a forward with no signature Python can read)
        return {}
    if any(p.kind is p.VAR_POSITIONAL for p in params[: len(args)]):
        return {}
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return {
        p.name: p.default
        for i, p in enumerate(named)
        if p.default is not p.empty
        and type(p.default) in _PLAIN
        and p.name not in kwargs
        and not (i < len(args) and p.kind is not p.KEYWORD_ONLY)
    }


def trace_as_called(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, trace_maps: bool = True
) -> Capture:
    """:func:`~.fx.trace` of ``model`` with the parameters the sample leaves at their defaults
    traced as those (:func:`defaults_left`)."""
    return trace(model, concrete_args=defaults_left(model, args, kwargs) or None, trace_maps=trace_maps)
