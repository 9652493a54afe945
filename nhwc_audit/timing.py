"""Measured speed: the original NCHW model, the naive channels_last model and the repaired one,
timed side by side with torch.utils.benchmark, interleaved so noise hits all three alike."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from .conversion import convert, prepare_inputs

__all__ = ["Measurement", "Timing", "measure"]


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per call of one variant: median and spread over interleaved rounds."""

    variant: str
    median: float
    low: float
    high: float
    rounds: int


@dataclass(frozen=True, slots=True)
class Measurement:
    """Forward (or forward+backward with ``train``) timings of the variants, same process."""

    train: bool
    device: str
    timings: tuple[Timing, ...]

    def of(self, variant: str) -> Timing | None:
        return next((t for t in self.timings if t.variant == variant), None)

    def speedup(self, variant: str) -> float | None:
        """NCHW median / variant median (> 1 means the variant is faster)."""
        base, other = self.of("nchw"), self.of(variant)
        if base is None or other is None or other.median <= 0:
            return None
        return base.median / other.median


def _step(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], train: bool) -> Callable[[], None]:
    def fwd() -> None:
        with torch.no_grad():
            model(*args, **kwargs)

    def fwd_bwd() -> None:
        out = model(*args, **kwargs)
        floats = [
            t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
        ]
        if floats:
            sum(t.float().mean() for t in floats).backward()  # type: ignore[union-attr]
        for p in model.parameters():
            p.grad = None

    return fwd_bwd if train else fwd


def measure(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    repaired: nn.Module | None = None,
    train: bool = False,
    rounds: int = 5,
    min_time: float = 0.05,
) -> Measurement:
    """Time ``model`` as given (NCHW), its channels_last conversion and ``repaired``.

    Each variant runs on its own copy (the user's model is untouched), after warm-up; each
    round times every variant once with ``torch.utils.benchmark.Timer.timeit`` (enough calls
    for ``min_time``), rounds interleave the variants; reported: median, min, max per call.
    """
    from torch.utils import benchmark

    kwargs = kwargs or {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cl_args, cl_kwargs = prepare_inputs(args, kwargs, dtype=None, device=device)
    nchw_args = tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t, cl_args)
    nchw_kwargs = tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t, cl_kwargs)
    variants: list[tuple[str, Callable[[], None]]] = [
        ("nchw", _step(copy.deepcopy(model), nchw_args, nchw_kwargs, train)),
        ("channels_last", _step(convert(model), cl_args, cl_kwargs, train)),
    ]
    if repaired is not None:
        variants.append(("repaired", _step(copy.deepcopy(repaired), cl_args, cl_kwargs, train)))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timers = []
    for name, fn in variants:
        fn()
        fn()  # warm-up (allocator, oneDNN primitive caches)
        sync()
        timer = benchmark.Timer(stmt="fn(); sync()", globals={"fn": fn, "sync": sync}, label=name)
        one = timer.timeit(1).median
        timers.append((name, timer, max(1, int(min_time / max(one, 1e-6)))))
    samples: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, timer, number in timers:
            samples[name].append(timer.timeit(number).median)
    timings = tuple(
        Timing(variant=name, median=statistics.median(v), low=min(v), high=max(v), rounds=rounds)
        for name, v in samples.items()
    )
    return Measurement(train=train, device=str(device), timings=timings)
