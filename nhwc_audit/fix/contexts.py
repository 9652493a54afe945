"""The repaired graph runs forward's ``torch.no_grad()`` and ``torch.autocast(...)`` blocks as
forward does.

torch.fx records the ops of such a block and not the block. A GraphModule run with autograd
builds a backward through the ops of a ``with torch.no_grad():`` block (or after
``torch.set_grad_enabled(False)``): a model repaired from such a trace trained on gradients the
model never has (a scale computed under ``no_grad`` from a conv's output sent its gradient into
the conv: 84.6 against 2.8e-05). Run under autocast, it computes a head the model keeps in
float32 (``torch.autocast(..., enabled=False)``) in the autocast dtype. The trace marks each node
made inside such blocks (:data:`~nhwc_audit.capture.context.NO_GRAD_KEY`,
:data:`~nhwc_audit.capture.context.AUTOCAST_KEY`); here each run of them is put between nodes
that enter the block and leave it (autograd back to what it was, not on).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
import torch.fx
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

from ..capture.blocks import custom_functions
from ..capture.context import AUTOCAST_KEY, NO_GRAD_KEY
from ..errors import ConversionError

__all__ = ["keep_blocks", "keep_state", "keeps_state"]

F = TypeVar("F", bound=Callable[..., Any])


def keeps_state(fn: F) -> F:
    """``fn`` (the repair) leaves grad mode and autocast (CPU and CUDA: on or off, dtype) as it found
    them, and so does the GraphModule it returns when its forward raises: a graph with forward's
    blocks enters and leaves them by plain calls, which a node that raises in between never makes
    (eager's ``with`` leaves them on the way out; the repair's checks run graphs that may raise)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        state = _state()
        try:
            out = fn(*args, **kwargs)
        finally:
            _restore(state)
        gm = out[0] if isinstance(out, tuple) and out else None
        if isinstance(gm, torch.fx.GraphModule) and _has_blocks(gm.graph):
            cls: Any = type(gm)  # the instance's own class (GraphModule makes one per instance)
            cls._wrapped_call = _Restoring(cls._wrapped_call)  # recompile keeps a class's own
        return out

    return cast(F, run)


def _state() -> tuple[bool, list[tuple[str, bool, torch.dtype]]]:
    return torch.is_grad_enabled(), [
        (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
    ]


def _restore(state: tuple[bool, list[tuple[str, bool, torch.dtype]]]) -> None:
    grad, casts = state
    torch._C._set_grad_enabled(grad)
    for device, on, dtype in casts:
        torch.set_autocast_enabled(device, on)
        torch.set_autocast_dtype(device, dtype)


class _Restoring:
    """A GraphModule's call (its ``_wrapped_call``) that puts grad mode and autocast back as they
    were when forward raises."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        state = _state()
        try:
            return self.inner(obj, *args, **kwargs)
        except BaseException:
            _restore(state)
            raise


def _has_blocks(graph: torch.fx.Graph) -> bool:
    return any(n.target in (torch._C._set_grad_enabled, _enter_autocast) for n in graph.nodes)


class _BlocksDropped(torch.fx.Tracer):
    """The tracer a pickled graph with such blocks names for its loading: a GraphModule loads by
    tracing its code again, which would run the calls that enter and leave the blocks (their
    arguments are constants) instead of recording them, and hand back a module without them."""

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> torch.fx.Graph:
        raise RuntimeError(
            "this repaired module keeps forward's torch.no_grad()/torch.autocast blocks, which loading it "
            "from a pickle (torch.load of the module) would drop: save it with nhwc-audit's --save-repaired, "
            "or save the model's state_dict and repair the model again"
        )


def keep_blocks(graph: torch.fx.Graph, *, grads: bool = True) -> int:
    """Put forward's gradient-off and autocast blocks back around the nodes traced inside them;
    the number of runs of nodes put inside one. Idempotent: a graph that has such nodes is left.
    :class:`ConversionError`, where the repair checks gradients (``grads``), for a graph of a
    custom ``autograd.Function``'s forward, whose own
    backward no graph keeps (a straight-through estimator's: the repaired model's conv gradient was
    0 where the model's is 30; the checks compared it with the naive graph, which has the same fault)."""
    if grads and (functions := custom_functions(graph)):  # (a repair for inference keeps its forward)
        raise ConversionError(
            f"repair: forward applies the custom autograd.Function {', '.join(functions)}; a torch.fx graph "
            "records the ops of its forward and trains through them with autograd's backward, not its own, so a "
            "repaired model would train otherwise: repair a submodule that does not apply it"
        )
    if _has_blocks(graph):
        return 0
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    grad = _runs(nodes, lambda n: bool(n.meta.get(NO_GRAD_KEY)))
    for first, last, _ in grad:
        with graph.inserting_before(first):
            prev = graph.call_function(torch.is_grad_enabled)
            graph.call_function(torch._C._set_grad_enabled, (False,))
        with graph.inserting_before(last.next):
            graph.call_function(torch._C._set_grad_enabled, (prev,))
    casts = _runs(nodes, lambda n: n.meta.get(AUTOCAST_KEY, ()))
    for first, last, blocks in casts:
        with graph.inserting_before(first):
            entered = [graph.call_function(_enter_autocast, tuple(b)) for b in blocks]
        with graph.inserting_before(last.next):
            for mode in reversed(entered):
                graph.call_function(_exit_autocast, (mode,))
    if grad or casts:  # a pickle of it refuses to load rather than lose them
        graph._tracer_cls = _BlocksDropped
        if graph.owning_module is not None:
            graph.owning_module._tracer_cls = _BlocksDropped
    return len(grad) + len(casts)


def _runs(
    nodes: list[torch.fx.Node], key: Callable[[torch.fx.Node], Any]
) -> list[tuple[torch.fx.Node, torch.fx.Node, Any]]:
    """The maximal runs of consecutive ``nodes`` with one truthy ``key``: (first, last, key)."""
    runs: list[tuple[torch.fx.Node, torch.fx.Node, Any]] = []
    i = 0
    while i < len(nodes):
        k = key(nodes[i])
        if not k:
            i += 1
            continue
        j = i
        while j + 1 < len(nodes) and key(nodes[j + 1]) == k:
            j += 1
        runs.append((nodes[i], nodes[j], k))
        i = j + 1
    return runs


def keep_state(gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """Register on ``gm`` each tensor of ``model``'s ``state_dict`` (the converted model it was made
    from) that its own lacks, under the model's name for it, as the parameter or buffer it is (the
    same tensor): a GraphModule holds only what its graph reads, under one name each, so the
    repaired ``state_dict`` lacked the model's keys and a strict ``load_state_dict`` of the model's
    weights raised. Such are a counter forward updates in Python (timm's
    ``BatchNormAct2d.num_batches_tracked``, which fx runs once while tracing), a module forward
    never calls (an EfficientNet encoder's unused head in segmentation_models_pytorch) and a module
    held under two names (MONAI DynUNet's ``skip_layers``). Optimizers see each parameter once, in the
    model's order (:func:`_in_model_order`)."""
    have = gm.state_dict(keep_vars=True).keys()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in have or not isinstance(t, torch.Tensor):
            continue  # (a module's get_extra_state is no tensor: not carried where fx traced through it)
        path, _, leaf = name.rpartition(".")
        owner: torch.nn.Module = gm
        for part in path.split(".") if path else ():
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            nxt = getattr(owner, part)
            if not isinstance(nxt, torch.nn.Module):
                break
            owner = nxt
        else:
            if hasattr(owner, leaf):
                continue
            if isinstance(t, torch.nn.Parameter):
                owner.register_parameter(leaf, t)
            else:
                owner.register_buffer(leaf, t)
    _in_model_order(gm, model)


def _in_model_order(gm: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give each module of ``gm`` its submodules, parameters and buffers in the order the module of the
    same path in ``model`` holds them (names it lacks after, as they were). A GraphModule holds them in the
    order its graph first reads them, so ``parameters()`` listed them in another order than the model's,
    and an optimizer's state (kept by position) saved while training the model and loaded to train the
    repaired one raised at ``step()`` or, where shapes matched, moved each parameter by another's moments
    (8 of 16 public models in a helper's sweep: nf_resnet26, MONAI's UNet and DynUNet, fastvit)."""
    for path, sub in list(gm.named_modules(remove_duplicate=False)):
        try:
            ref = model.get_submodule(path)
        except AttributeError:
            continue
        for table in ("_modules", "_parameters", "_buffers"):
            mine, theirs = sub.__dict__.get(table), ref.__dict__.get(table)
            if not isinstance(mine, dict) or not isinstance(theirs, dict):
                continue  # a TorchScript module's tables are its own (no order to give)
            rank = {k: i for i, k in enumerate(theirs.keys())}
            ordered = sorted(mine.items(), key=lambda kv: rank.get(kv[0], len(rank)))  # (stable)
            if [k for k, _ in ordered] != list(mine):
                mine.clear()
                mine.update(ordered)
