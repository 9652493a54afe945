"""Measured speed: the original NCHW model, the naive channels_last model and the repaired one,
timed side by side with torch.utils.benchmark, interleaved so noise hits all three alike."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import first_line
from ..prepare.copy import convert, prepare_inputs
from ..propagate.fresh_args import FreshArgs
from ..propagate.onednn import guarded
from ..propagate.runner import quiet
from ..tensors import iter_tensors
from .quiet import profiler_notices_silenced

__all__ = ["Measurement", "Timing", "measure", "profile_copies"]

_COPY_EVENTS = frozenset({"aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize"})
_RANGE = "nhwc-audit:"


class _Ranged(FreshArgs):
    """Runs each node inside a profiler range named after it."""

    def run_node(self, n: torch.fx.Node) -> Any:
        with torch.profiler.record_function(_RANGE + n.name):
            return super().run_node(n)


def profile_copies(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    converted: nn.Module | None = None,
    graph: torch.fx.Graph | None = None,
    constants: Sequence[tuple[str, Any]] = (),
    rounds: int = 5,
    nodes: frozenset[str] | None = None,
) -> tuple[tuple[str, float], ...]:
    """Run the channels_last conversion of ``model`` (``converted``, else converted here) as a
    torch.fx graph (``graph``, the audit's own capture, else traced here) ``rounds`` times under
    the profiler with a range per node, and take, per node, the median over the rounds of the
    self time of the ATen copy kernels inside it (one profiled run varies several-fold on a
    busy machine). Copies a kernel makes below ATen (oneDNN reorders inside a conv) are not
    visible. ``nodes``: only these (the nodes the audit found changing layout; a pad or an
    upsample in an NCHW region copies too, without changing layout). Returns () when the model
    is not fx-traceable."""
    from torch.profiler import ProfilerActivity, profile

    from ..capture.fx import trace
    from ..capture.kept import put_back
    from ..propagate.inputs import positional_inputs

    root = converted if converted is not None else convert(model)
    put_back(root, list(constants))  # what the graph's get_attr nodes read (tensor constants)
    try:
        gm = torch.fx.GraphModule(root, copy.deepcopy(graph)) if graph is not None else trace(root).gm
    except Exception:
        return ()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cl_args, cl_kwargs = prepare_inputs(args, kwargs or {}, dtype=None, device=device)
    values = positional_inputs(gm, cl_args, cl_kwargs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    per_round: list[dict[str, float]] = []
    with torch.no_grad():
        _Ranged(gm).run(*values, enable_io_processing=False)  # warm-up
        for _ in range(max(1, rounds)):
            with profile(activities=activities) as prof:
                _Ranged(gm).run(*values, enable_io_processing=False)
            per_round.append(_copy_times(prof.events(), nodes))
    seen = {name for totals in per_round for name in totals}
    medians = {name: statistics.median(t.get(name, 0.0) for t in per_round) for name in seen}
    return tuple(sorted(((n, t) for n, t in medians.items() if t > 0), key=lambda kv: (-kv[1], kv[0])))


def _copy_times(events: Any, nodes: frozenset[str] | None) -> dict[str, float]:
    """Seconds of ATen copy kernels (self time) per node range of one profiled run."""
    totals: dict[str, float] = {}
    for ev in events:
        if ev.name not in _COPY_EVENTS:
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith(_RANGE):
            parent = parent.cpu_parent
        if parent is not None:
            name = parent.name[len(_RANGE) :]
            if nodes is None or name in nodes:
                totals[name] = totals.get(name, 0.0) + ev.self_cpu_time_total / 1e6
    return totals


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per call of one variant: median and spread over interleaved rounds."""

    variant: str
    median: float
    low: float
    high: float
    rounds: int
    samples: tuple[float, ...] = ()
    """Seconds per call in each round, in round order (rounds interleave the variants)."""


@dataclass(frozen=True, slots=True)
class Measurement:
    """Forward (or forward+backward with ``train``) timings of the variants, same process."""

    train: bool
    device: str
    timings: tuple[Timing, ...]
    copies: tuple[tuple[str, float], ...] = ()
    """Profiler-measured time (s) of ATen copy kernels inside each node of the channels_last
    graph that the audit found changing layout, costliest first (record_function ranges around
    every fx node; the median over the measurement's rounds)."""
    untimed: tuple[tuple[str, str], ...] = ()
    """(variant, why) of the variants that could not run: the naive channels_last model raises
    where the model breaks on channels_last."""

    def of(self, variant: str) -> Timing | None:
        return next((t for t in self.timings if t.variant == variant), None)

    def speedup(self, variant: str) -> float | None:
        """NCHW median / variant median (> 1 means the variant is faster)."""
        base, other = self.of("nchw"), self.of(variant)
        if base is None or other is None or other.median <= 0:
            return None
        return base.median / other.median

    def round_speedups(self, variant: str) -> tuple[float, ...]:
        """NCHW time / ``variant`` time round by round (the rounds interleave the variants, so a slow
        spell of the machine hits both of a round alike); () where either was not timed."""
        base, other = self.of("nchw"), self.of(variant)
        if base is None or other is None or len(base.samples) != len(other.samples):
            return ()
        return tuple(b / o for b, o in zip(base.samples, other.samples, strict=True) if o > 0)


def _step(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], train: bool) -> Callable[[], None]:
    def fwd() -> None:
        with torch.no_grad():
            model(*args, **kwargs)

    params = list(model.parameters())

    def fwd_bwd() -> None:
        out = model(*args, **kwargs)
        floats = [t for t in iter_tensors(out) if t.is_floating_point() and t.requires_grad]
        if floats:
            with guarded(params):  # a oneDNN kernel that would crash the process
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
    graph: torch.fx.Graph | None = None,
    constants: Sequence[tuple[str, Any]] = (),
    nodes: frozenset[str] | None = None,
) -> Measurement:
    """Time ``model`` as given (NCHW), its channels_last conversion and ``repaired``; the
    profiler's copy times per node (of ``nodes`` when given: the audit's layout changes) run
    ``graph`` (the audit's fx capture) when given, over the same number of rounds.

    Each variant runs on its own copy (the user's model is untouched), after warm-up; each
    round times every variant once with ``torch.utils.benchmark.Timer.timeit`` (enough calls
    for ``min_time``), rounds interleave the variants; reported: median, min, max per call.
    """
    with profiler_notices_silenced():  # (its first import logs a CUDA_HOME notice on a machine without CUDA)
        from torch.utils import benchmark
    kwargs = kwargs or {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cl_args, cl_kwargs = prepare_inputs(args, kwargs, dtype=None, device=device)
    nchw_args = tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t, cl_args)
    nchw_kwargs = tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t, cl_kwargs)
    converted = convert(model)
    variants: list[tuple[str, Callable[[], None]]] = [
        ("nchw", _step(copy.deepcopy(model), nchw_args, nchw_kwargs, train)),
        ("channels_last", _step(converted, cl_args, cl_kwargs, train)),
    ]
    if repaired is not None:
        variants.append(("repaired", _step(copy.deepcopy(repaired), cl_args, cl_kwargs, train)))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timers = []
    untimed: list[tuple[str, str]] = []
    for name, fn in variants:
        try:  # (a GraphModule prints the traceback of what it raises to stderr: kept off it)
            with quiet():
                fn()
                fn()  # warm-up (allocator, oneDNN primitive caches)
                sync()
        except Exception as e:  # time what can be timed; say what could not
            untimed.append((name, first_line(e)))
            continue
        timer = benchmark.Timer(stmt="fn(); sync()", globals={"fn": fn, "sync": sync}, label=name)
        one = timer.timeit(1).median
        timers.append((name, timer, max(1, int(min_time / max(one, 1e-6)))))
    samples: dict[str, list[float]] = {name: [] for name, _, _ in timers}
    for _ in range(rounds):
        for name, timer, number in timers:
            samples[name].append(timer.timeit(number).median)
    timings = tuple(
        Timing(variant=name, median=statistics.median(v), low=min(v), high=max(v), rounds=rounds, samples=tuple(v))
        for name, v in samples.items()
    )
    try:
        with profiler_notices_silenced():  # (the profiler's native start, stop and GPU-count lines)
            copies = profile_copies(
                model, args, kwargs, converted=converted, graph=graph, constants=constants, rounds=rounds, nodes=nodes
            )
    except Exception:  # the channels_last graph raises (a break): nothing to attribute
        copies = ()
    return Measurement(train=train, device=str(device), timings=timings, copies=copies, untimed=tuple(untimed))
