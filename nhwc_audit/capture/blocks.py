"""What a torch.fx trace cannot see of forward's blocks, noted while it runs: the
``torch.autocast`` blocks open at each node (:func:`autocast_blocks_noted`), and the grad mode each
``torch.autograd.Function`` was applied in (:func:`function_grad_noted`). fx records no grad mode
and no autocast state; the tracer puts both on the nodes it makes
(:data:`~.context.NO_GRAD_KEY`, :data:`~.context.AUTOCAST_KEY`). Each patch holds for one trace."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx

from .context import FUNCTION_KEY

__all__ = ["AutocastBlock", "autocast_blocks_noted", "custom_backward_note", "function_grad_noted"]

AutocastBlock = tuple[str, "torch.dtype | None", bool, bool]
"""An autocast block's arguments: device, dtype, enabled, cache_enabled."""

_ASKED = "_nhwc_audit_enabled"
"""Where a trace keeps the ``enabled`` an autocast block was made with (torch turns a CUDA block off
on a machine without CUDA, in the object itself)."""


@contextlib.contextmanager
def autocast_blocks_noted(blocks: list[AutocastBlock]) -> Iterator[None]:
    """While it lasts, ``blocks`` holds forward's open autocast blocks, outermost first. A block
    changes no state fx sees when it turns autocast off, as a float32 head does."""
    cls = torch.amp.autocast_mode.autocast
    init, enter, leave = cls.__init__, cls.__enter__, cls.__exit__

    def made(cm: Any, *args: Any, **kwargs: Any) -> None:
        init(cm, *args, **kwargs)
        # as asked: a CUDA block on a machine without CUDA turns itself off, and so would the repair's
        asked = args[2] if len(args) > 2 else kwargs.get("enabled", True)
        cm.__dict__[_ASKED] = bool(asked)

    def entered(cm: Any) -> Any:
        out = enter(cm)  # type: ignore[no-untyped-call]
        blocks.append((cm.device, cm.fast_dtype, cm.__dict__.get(_ASKED, cm._enabled), cm._cache_enabled))
        return out

    def left(cm: Any, *exc: Any) -> Any:
        if blocks:
            blocks.pop()
        return leave(cm, *exc)

    cls.__init__, cls.__enter__, cls.__exit__ = made, entered, left  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        cls.__init__, cls.__enter__, cls.__exit__ = init, enter, leave  # type: ignore[method-assign]


@contextlib.contextmanager
def function_grad_noted(functions: list[tuple[bool, str]]) -> Iterator[None]:
    """While it lasts, ``functions`` holds, per open ``autograd.Function``, the grad mode the outermost
    one was applied in and its class's name (:data:`~.context.FUNCTION_KEY`). Autograd runs a
    Function's forward without grad (a reentrant checkpoint's ``CheckpointFunction``): its nodes keep
    the mode the model runs them in, or a train audit would run them without autograd and lose the
    backward through them (timm's reentrant checkpoints: 0 B of backward where eager moves 32,768).
    The audit's backward of them is autograd's, exact for a checkpoint (it recomputes the same ops),
    and not another Function's own backward (:func:`custom_backward_note`)."""
    function = torch.autograd.Function
    apply = function.__dict__["apply"]

    def applied(fn: Any, *args: Any, **kwargs: Any) -> Any:
        functions.append(functions[0] if functions else (torch.is_grad_enabled(), fn.__name__))
        try:
            return apply.__get__(None, fn)(*args, **kwargs)
        finally:
            functions.pop()

    function.apply = classmethod(applied)
    try:
        yield
    finally:
        function.apply = apply


_RECOMPUTED = frozenset({"CheckpointFunction"})
"""Functions whose backward is autograd's of their forward's ops, recomputed (torch's checkpoint)."""


def custom_backward_note(graph: torch.fx.Graph) -> str | None:
    """What a train audit tells of the ``autograd.Function``s whose nodes ``graph`` holds, their own
    backward not run (:data:`~.context.FUNCTION_KEY`); None when there are none but checkpoints."""
    names = sorted({n.meta[FUNCTION_KEY][1] for n in graph.nodes if FUNCTION_KEY in n.meta} - _RECOMPUTED)
    if not names:
        return None
    return (
        f"backward: custom autograd.Function {', '.join(names)}: audited as autograd's backward of the ops its "
        "forward runs; its own backward (and any copy it makes) is not run"
    )
