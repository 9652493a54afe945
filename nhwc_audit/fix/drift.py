"""Does a repaired graph of a model in training keep the model's state as the model does? A state
update forward makes in Python runs once while torch.fx traces, and is not in the graph."""

from __future__ import annotations

import torch
from torch import nn

from ..propagate.runner import quiet
from . import results as res
from .results import Sample

__all__ = ["STATE", "counted", "state_drift"]


STATE = 1e-3
"""Relative distance (norms, of the buffer's own; :data:`ROUNDING` sets a floor) past which a buffer a
training-mode forward updates has drifted from the converted model's, not rounded (the graph runs
its kernels: ~1e-7 after two updates; the NCHW model's statistics are 1e-3 away at 32 x 32 in timm
efficientnet_b0, and a conversion's rounding is no drift)."""
ROUNDING = 1e-6
"""Relative to the largest floating buffer of its module, the distance a buffer may end at by rounding
alone (float32, a few updates), whatever its own norm: a running mean of ~1e-9 is judged so."""


def state_drift(model: nn.Module, gm: torch.fx.GraphModule, samples: list[Sample]) -> tuple[str | None, dict[str, int]]:
    """Where ``gm`` (a graph of ``model``, the model converted to channels_last, in training mode) does
    not update the model's buffers as the model does: each runs forward on every sample in turn, on
    its own copy, and the buffers are compared by name. A state update forward makes in Python on a
    buffer alone runs once while torch.fx traces, and is not in the graph (timm's
    ``BatchNormAct2d(momentum=None)`` divides by ``num_batches_tracked``, a constant in the graph: the
    running statistics drift from the second step on). Returns why the floating state drifted (None
    where it agrees, or where one cannot run) and the counters forward advances by a fixed step in
    Python that the graph leaves (:func:`counted`: the same BatchNormAct2d's ``num_batches_tracked``)."""
    start = {n: b.clone() for n, b in model.named_buffers() if not b.is_floating_point() and b.numel() == 1}
    if not start and not any(b.is_floating_point() for b in model.buffers()):
        return None, {}  # no state to drift (the forwards are spared)
    runs = []
    for m in (model, gm):
        copied = res.fresh_copy(m)
        try:
            with quiet():  # (a GraphModule prints the traceback of what it raises)
                for args, kwargs in samples:  # (random draws in logical order: one dropout mask in both)
                    res.outputs(copied, args, kwargs, grads=False)
        except Exception:
            return None, {}  # one raises (a break left unrepaired): the checks of its results say so
        runs.append(dict(copied.named_buffers()))
    own, graph = runs
    counts = {}
    for name, was in start.items():
        moved, left = int(own[name] - was), int(graph.get(name, was) - was)
        if moved and not left and moved % len(samples) == 0:
            counts[name] = moved // len(samples)
    # a buffer is judged at its own norm, and no finer than rounding at its module's scale: BatchNorm's
    # running mean of a zero-mean input (a 1x1 conv without bias after a norm: MobileNetV2's and
    # EfficientNet's blocks) is rounding alone, ~1e-9; a small average forward updates in Python beside
    # a large table is not (a review's case)
    scales: dict[str, float] = {}
    for name, b in own.items():
        if b.is_floating_point():
            owner = name.rpartition(".")[0]
            scales[owner] = max(scales.get(owner, 0.0), float(b.double().norm()))
    for name, b in own.items():
        g = graph.get(name)
        if g is None or not b.is_floating_point() or g.shape != b.shape:
            continue
        scale = float(b.double().norm())
        gap = float((g.double() - b.double()).norm())
        if gap > max(STATE * scale, ROUNDING * scales[name.rpartition(".")[0]], 1e-12):
            return (
                f"{name} ends {gap / max(scale, 1e-12):.1e} away from the model's after {len(samples)} training-mode "
                "forwards (forward updates it in Python, which torch.fx runs once while tracing, as timm's "
                "BatchNormAct2d does with momentum=None); repair the model in eval mode (model.eval()) for "
                "inference, or make that update traceable"
            ), counts
    return None, counts


def counted(gm: torch.fx.GraphModule, counts: dict[str, int]) -> None:
    """Advance each counter of ``counts`` (a buffer of ``gm``'s by name, :func:`state_drift`) by its step
    at the start of ``gm``'s graph: a checkpoint of the repaired model counts its batches as the model's
    does (timm's 33 BatchNormAct2d models in a helper's sweep left them at the count of the repair)."""
    if not counts:
        return
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        for name, step in counts.items():
            gm.graph.call_method("add_", (gm.graph.get_attr(name), step))
    if getattr(gm, "_tracer_cls", None) is None:  # (one that keeps forward's blocks refuses to load anyway)
        gm._tracer_cls = gm.graph._tracer_cls = _CountersTraced
    gm.recompile()


class _CountersTraced(torch.fx.Tracer):
    """The tracer a pickled repaired graph that advances counters names for its loading: a GraphModule
    loads by tracing its code again, and torch's Tracer runs an update of a buffer (``add_`` on the
    real counter, once, at load) instead of recording it; buffers traced as values record it."""

    proxy_buffer_attributes = True
