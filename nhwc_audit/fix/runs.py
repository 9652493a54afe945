"""A checking run of a model: its results on one sample (:func:`outputs`: its outputs, and its
parameters' gradients of a fixed random linear loss), on a private copy (:func:`fresh_copy`)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..prepare.clone import clone_modules
from ..propagate.dispatch import LogicalDraws
from ..tensors import clone_value, iter_tensors, seeded
from .grads import gradients

__all__ = ["Results", "Sample", "fresh_copy", "outputs"]

Sample = tuple[tuple[Any, ...], dict[str, Any]]
Results = tuple[list[torch.Tensor], dict[str, torch.Tensor]]
"""A model's outputs, and its parameters' gradients by name, on one sample."""


def outputs(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grads: bool,
    run: Callable[..., Any] | None = None,
    reference: dict[str, Any] | None = None,
) -> Results:
    """``model``'s outputs on ``(args, kwargs)`` (copied first) and, with ``grads``, its
    parameters' gradients by name; ``run`` calls the model another way (an interpreter over it).
    Random draws are made in the tensors' logical order (:class:`LogicalDraws`) where the model
    draws: ``reference`` (the dict of one repair's checks, all runs of one model and its rewrites)
    learns that from its first run, made under the mode, which sees every op that draws (one under
    ``torch.random.fork_rng()`` or from a generator of the model's own too, which leave the global
    generator as it was); one that drew none is run again without it. No mode where none is needed:
    the mode costs a Python call per ATen op (~8% of a repair), and a run under any Python dispatch
    mode can take other kernel paths than the user's (timm efficientformer_l1 at batch 1: its NCHW
    model's BatchNorm backward, handed a channels_last-strided gradient, is wrong without one and
    right under one)."""
    if reference is not None and "draws" not in reference:
        got, drew = _outputs(model, args, kwargs, grads, run, LogicalDraws())
        reference["draws"] = drew
        if drew:
            return got
    draws = None if reference is not None and reference.get("draws") is False else LogicalDraws()
    return _outputs(model, args, kwargs, grads, run, draws)[0]


def _outputs(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grads: bool,
    run: Callable[..., Any] | None,
    draws: LogicalDraws | None,
) -> tuple[Results, bool]:
    """:func:`outputs` under ``draws`` (or no mode), and whether the run drew random numbers."""
    g: dict[str, torch.Tensor] = {}
    with seeded(0, (args, kwargs)), torch.enable_grad() if grads else torch.no_grad():
        with draws or contextlib.nullcontext():  # dropout's mask is one whatever the layout
            out = (run or model)(*tree_map(clone_value, args), **tree_map(clone_value, kwargs))
        tensors = iter_tensors(out)
        floats = [t for t in tensors if t.is_floating_point() and t.requires_grad] if grads else []
        if floats:
            # a fixed random linear loss (the sum of a softmax output has no gradient), drawn
            # from a generator of its own: the draws watched are the model's
            gen = torch.Generator().manual_seed(7)
            weights = [torch.randn(t.shape, generator=gen).to(t.device) for t in floats]
            loss = sum((t.float() * w).sum() for t, w in zip(floats, weights, strict=True))
            assert isinstance(loss, torch.Tensor)
            names = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            with draws or contextlib.nullcontext():
                got = gradients(loss, [p for _, p in names])
            g = {n: gr for (n, _), gr in zip(names, got, strict=True) if gr is not None}
        drew = draws is not None and draws.drew
    return ([t.detach() for t in tensors], g), drew


def fresh_copy(model: nn.Module) -> nn.Module:
    """A private copy for a checking run (buffers copied: BatchNorm stats must not drift;
    parameters shared). A GraphModule's copy runs the same graph and code (a check never changes
    them) on its own module tree: its own deepcopy generates its code again (15.6 ms against
    2.6 ms on the bundled UNet)."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    if not isinstance(model, torch.fx.GraphModule):
        return clone_modules(model, memo)
    new = object.__new__(type(model))  # the instance's own class: its forward is the graph's code
    new.__dict__.update(model.__dict__)
    for k, v in model.__dict__.items():
        if isinstance(v, torch.Tensor):  # torch.export's lifted constants: a graph may write to them
            new.__dict__[k] = copy.deepcopy(v, memo)
    new.__dict__["_parameters"] = dict(model._parameters)
    new.__dict__["_buffers"] = {n: None if b is None else copy.deepcopy(b, memo) for n, b in model._buffers.items()}
    new.__dict__["_modules"] = {n: None if c is None else clone_modules(c, memo) for n, c in model._modules.items()}
    return new
