"""What a torch.fx trace cannot see of forward's blocks, noted while it runs: the
``torch.autocast`` blocks open at each node (:func:`autocast_blocks_noted`), and the grad mode each
``torch.autograd.Function`` was applied in (:func:`function_grad_noted`). fx records no grad mode
and no autocast state; the tracer puts both on the nodes it makes
(:data:`~.context.NO_GRAD_KEY`, :data:`~.context.AUTOCAST_KEY`). Each patch holds for one trace."""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx

from .context import CHECKPOINT_KEY, FUNCTION_KEY

__all__ = [
    "AutocastBlock",
    "Checkpoints",
    "autocast_blocks_noted",
    "checkpoint_count",
    "checkpoint_note",
    "checkpoints_noted",
    "custom_backward_note",
    "custom_functions",
    "function_grad_noted",
]

AutocastBlock = tuple[str, "torch.dtype | None", bool, bool]
"""An autocast block's arguments: device, dtype, enabled, cache_enabled."""

_ASKED = "_nhwc_audit_enabled"
"""Where a trace keeps the ``enabled`` an autocast block was made with (torch turns a CUDA block off
on a machine without CUDA, in the object itself)."""


class _Patch:
    """One trace's patch of a class attribute: on while the trace runs, in its thread only."""

    def __init__(self) -> None:
        self.owner, self.on = threading.get_ident(), True

    @property
    def mine(self) -> bool:
        """A call to record: made while the trace runs, by its thread."""
        return self.on and threading.get_ident() == self.owner


@contextlib.contextmanager
def _patched(cls: Any, name: str, make: Any) -> Iterator[_Patch]:
    """``cls.<name>`` set to ``make(current, patch)`` while it lasts, over whatever is there (another
    trace's patch: each passes on the calls that are not its own). On the way out the patch turns
    off and comes off with every patch above it that is off too, in whatever order traces end."""
    patch = _Patch()
    current = cls.__dict__[name]
    made = make(current, patch)
    setattr(getattr(made, "__func__", made), _STATE, (patch, current))
    setattr(cls, name, made)
    try:
        yield patch
    finally:
        patch.on = False
        while (state := getattr(getattr(top := cls.__dict__[name], "__func__", top), _STATE, None)) and not state[0].on:
            setattr(cls, name, state[1])


_STATE = "_nhwc_audit_patch"


@contextlib.contextmanager
def autocast_blocks_noted(blocks: list[AutocastBlock]) -> Iterator[None]:
    """While it lasts, ``blocks`` holds forward's open autocast blocks, outermost first. A block
    changes no state fx sees when it turns autocast off, as a float32 head does. Blocks entered by
    other threads are theirs: not noted."""
    cls = torch.amp.autocast_mode.autocast

    def made(init: Any, patch: _Patch) -> Any:
        def wrapper(cm: Any, *args: Any, **kwargs: Any) -> None:
            init(cm, *args, **kwargs)
            # as asked: a CUDA block on a machine without CUDA turns itself off, and so would the repair's
            asked = args[2] if len(args) > 2 else kwargs.get("enabled", True)
            cm.__dict__[_ASKED] = bool(asked)

        return wrapper

    def entered(enter: Any, patch: _Patch) -> Any:
        def wrapper(cm: Any) -> Any:
            out = enter(cm)
            if patch.mine:
                blocks.append((cm.device, cm.fast_dtype, cm.__dict__.get(_ASKED, cm._enabled), cm._cache_enabled))
            return out

        return wrapper

    def left(leave: Any, patch: _Patch) -> Any:
        def wrapper(cm: Any, *exc: Any) -> Any:
            if blocks and patch.mine:
                blocks.pop()
            return leave(cm, *exc)

        return wrapper

    with _patched(cls, "__init__", made), _patched(cls, "__enter__", entered), _patched(cls, "__exit__", left):
        yield


class Checkpoints:
    """The ``torch.utils.checkpoint`` calls open while a trace runs (:data:`~.context.CHECKPOINT_KEY`):
    each numbered in the order the trace meets it."""

    def __init__(self) -> None:
        self.open: list[int] = []
        self.met = 0
        self.options: dict[int, dict[str, Any]] = {}
        """Each checkpoint's arguments but its function's (``context_fn``, ``early_stop``,
        ``preserve_rng_state``...), by number (:data:`~.context.CHECKPOINT_OPTIONS_KEY`)."""

    @contextlib.contextmanager
    def region(self, reentrant: bool = False, options: dict[str, Any] | None = None) -> Iterator[None]:
        """One checkpoint open while it lasts; a reentrant one's number is negative."""
        self.met += 1
        self.open.append(-self.met if reentrant else self.met)
        self.options[self.open[-1]] = dict(options or {})
        try:
            yield
        finally:
            self.open.pop()


_OPTIONS = ("preserve_rng_state", "context_fn", "determinism_check", "debug", "early_stop")
"""The arguments of a non-reentrant checkpoint kept with it (a selective checkpoint's policy is its ``context_fn``)."""


@contextlib.contextmanager
def checkpoints_noted(checkpoints: Checkpoints) -> Iterator[None]:
    """While it lasts, ``checkpoints`` holds the non-reentrant checkpoints open (``use_reentrant=False``;
    the reentrant ones: :func:`function_grad_noted`). Its function runs between the two steps of
    torch's generator, which runs as it is."""
    import torch.utils.checkpoint as ckpt

    def made(impl: Any, patch: _Patch) -> Any:
        def noted(*args: Any, **kwargs: Any) -> Iterator[Any]:
            if not patch.mine:
                yield from impl(*args, **kwargs)
                return
            defaults = inspect.signature(impl).parameters
            asked = {k: kwargs[k] for k in _OPTIONS if k in kwargs and kwargs[k] is not defaults[k].default}
            with checkpoints.region(options=asked):
                yield from impl(*args, **kwargs)

        return noted

    with _patched(ckpt, "_checkpoint_without_reentrant_generator_impl", made):
        yield


@contextlib.contextmanager
def function_grad_noted(functions: list[tuple[bool, str]], checkpoints: Checkpoints | None = None) -> Iterator[None]:
    """While it lasts, ``functions`` holds, per open ``autograd.Function``, the grad mode the outermost
    one was applied in and its class's name (:data:`~.context.FUNCTION_KEY`). Autograd runs a
    Function's forward without grad: its nodes keep the mode the model runs them in, or a train
    audit would run them without autograd and lose the backward through them. Their backward in the
    audit is autograd's, not the Function's own (:func:`custom_functions`). torch's reentrant
    checkpoint (``CheckpointFunction``, whose backward recomputes its function with autograd) is
    traced as its function called as it is, forward's own ``no_grad`` blocks inside it kept (timm's
    reentrant checkpoints: 0 B of backward where eager moves 32,768). Other threads' Functions are
    theirs: applied as they are. ``checkpoints``: where the reentrant checkpoints open are kept."""
    from torch.utils.checkpoint import CheckpointFunction

    def applying(apply: Any, patch: _Patch) -> Any:
        def applied(fn: Any, *args: Any, **kwargs: Any) -> Any:
            if not patch.mine:
                return apply.__get__(None, fn)(*args, **kwargs)
            if fn is CheckpointFunction and not functions:
                run, preserve, *inputs = args  # (function, preserve_rng_state, *args)
                opened = (
                    checkpoints.region(True, {} if preserve else {"preserve_rng_state": False}) if checkpoints else None
                )
                with opened or contextlib.nullcontext():
                    return run(*inputs)
            functions.append(functions[0] if functions else (torch.is_grad_enabled(), fn.__name__))
            try:
                return apply.__get__(None, fn)(*args, **kwargs)
            finally:
                functions.pop()

        return classmethod(applied)

    with _patched(torch.autograd.Function, "apply", applying):
        yield


def custom_functions(graph: torch.fx.Graph) -> list[str]:
    """The ``autograd.Function``s, applied with grad on, whose forward's nodes ``graph`` holds
    (:data:`~.context.FUNCTION_KEY`): a graph runs their ops with autograd's backward, not theirs."""
    return sorted({n.meta[FUNCTION_KEY][1] for n in graph.nodes if n.meta.get(FUNCTION_KEY, (False,))[0]})


def custom_backward_note(graph: torch.fx.Graph) -> str | None:
    """What a train audit tells of :func:`custom_functions`; None when there are none."""
    names = custom_functions(graph)
    if not names:
        return None
    return (
        f"backward: custom autograd.Function {', '.join(names)}: audited as autograd's backward of the ops its "
        "forward runs; its own backward (and any copy it makes) is not run"
    )


def checkpoint_count(graph: torch.fx.Graph) -> int:
    """How many ``torch.utils.checkpoint`` calls ``graph``'s capture saw (nested ones too)."""
    return len({k for n in graph.nodes for k in n.meta.get(CHECKPOINT_KEY, ())})


def checkpoint_note(graph: torch.fx.Graph) -> str | None:
    """What a train audit tells of the checkpoints its capture saw; None when there are none."""
    count = checkpoint_count(graph)
    if not count:
        return None
    return (
        f"backward: {count} torch.utils.checkpoint block{'s' if count != 1 else ''} recompute their forward in "
        "backward: the layout changes inside are counted once per run"
    )
