"""Repair stage: rewrite the channels_last model's fx graph to remove avoidable transposes, keeping
the math. Every rewrite (:mod:`.rewrites`) is tried on a private copy and re-measured (bytes moved
by layout changes); the rewrites of a pass that remove bytes or a break are checked against the
original's outputs and gradients (:mod:`.equivalence`) together, once; a failing group is bisected."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_map

from ..capture.defaults import defaults_left, trace_as_called
from ..capture.kept import put_back
from ..capture.proxies import in_place_operator
from ..errors import ConversionError, TraceError, first_line
from ..prepare.copy import convert, prepare_inputs
from ..propagate.runner import quiet
from . import results as res
from .buffers import read_through
from .checkpoints import with_checkpoints
from .contexts import keep_blocks, keep_state, keeps_state
from .deviation import deviations
from .drift import counted, state_drift
from .equivalence import first_change
from .follows import exposed_pair
from .islands import rewritten_nodes
from .log import RepairLog, RepairStep
from .measure import Measured, measure, with_backward
from .modes import mode_note
from .rewrites import PRIORITY, Candidate, candidates, rewritable_copy
from .trace_check import check_trace

__all__ = ["RepairLog", "RepairStep", "repair_model", "repair_samples"]


def _apply(gm: torch.fx.GraphModule, cands: list[Candidate], *, compile: bool = True) -> None:
    """Rewrite ``gm`` (a :func:`~.rewrites.rewritable_copy`) with ``cands``; ``compile``: generate its code
    (to call it as a module; an interpreter runs the graph without)."""
    for cand in cands:
        cand.apply(gm)
    gm.graph.lint()
    if compile:
        gm.recompile()


def _checked(
    base: torch.fx.GraphModule,
    batch: list[tuple[Candidate, RepairStep]],
    change: Callable[[torch.fx.GraphModule], str | None],
    refused: dict[tuple[str, str], str],
) -> list[tuple[Candidate, RepairStep]]:
    """The rewrites of ``batch`` that keep the math, applied in order on ``base``: the whole
    group is checked once; a group that changes the results is split in halves (the first
    half on ``base``, the second on top of what the first kept) down to the rewrite to refuse."""
    trial = rewritable_copy(base)
    try:  # (a GraphModule prints the traceback of what it raises to stderr: kept off it)
        _apply(trial, [c for c, _ in batch])
        with quiet():
            problem = change(trial)
    except Exception as e:
        problem = f"the rewrite failed: {first_line(e)}"
    if problem is None:
        return batch
    if len(batch) == 1:
        cand = batch[0][0]
        refused[(cand.node, cand.kind)] = problem
        return []
    half = len(batch) // 2
    first = _checked(base, batch[:half], change, refused)
    if first:
        base = rewritable_copy(base)
        _apply(base, [c for c, _ in first], compile=False)
    return first + _checked(base, batch[half:], change, refused)


def repair_samples(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[res.Sample]:
    """What a repair checks on: the sample, channels_last (copied), and a second random input of the
    same shapes (floating tensors drawn; others as they are)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sample = prepare_inputs(args, kwargs, dtype=None, device=device)
    g = torch.Generator(device="cpu").manual_seed(1)

    def drawn(t: Any) -> Any:
        floating = isinstance(t, torch.Tensor) and t.is_floating_point()
        return torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) if floating else t

    return [sample, tree_map(drawn, sample)]


@keeps_state
def repair_model(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    bandwidth: float = 1e9,
    grads: bool = True,
    max_passes: int = 4,
    graph: torch.fx.Graph | None = None,
    graph_checked: bool = True,
    constants: Sequence[tuple[str, Any]] = (),
    baseline: Mapping[str, tuple[int, int]] | None = None,
    backward: Mapping[str, tuple[int, int]] | None = None,
    traced_writes: Sequence[str] | None = None,
) -> tuple[torch.fx.GraphModule, RepairLog]:
    """Return a repaired channels_last GraphModule of ``model`` and the log of what changed.

    The model is never modified. Needs a torch.fx-traceable model; ``graph`` (an audit's fx capture
    of the same module tree, with ``constants``, :func:`~nhwc_audit.capture.kept.graph_attributes`)
    saves the trace (checked here unless ``graph_checked``: the audit checked it), and ``baseline`` (node
    name -> the bytes it moves and its kernels copy inside when the model runs NCHW, the audit's
    ``nchw_bytes`` and ``nchw_inside``) charges
    the graph's nodes as the audit did; without it every copy is charged whole. Outputs (and, with
    ``grads``, parameter gradients of a fixed random linear loss) are checked against the
    original model on the sample and on a second random input of the same shapes, at the
    float tolerance that converting to channels_last itself costs; a rewrite that changes
    them is refused. ``backward`` (a train audit's: node name -> what its backward moves when the
    model runs NCHW, and what its kernels copy of what they made there): the log's bytes and
    summaries count one backward pass too, as the audit does.
    ``traced_writes``: the buffers forward wrote while ``graph`` was traced (None: not known, checked).
    """
    kwargs, baseline = kwargs or {}, baseline or {}
    samples = repair_samples(model, args, kwargs)
    sample_args, sample_kwargs = samples[0]
    current: Measured | None = None  # the measurement of the graph kept, when its check took one
    for maps in (True, False):  # a trace of 4D/5D buffers that is not the model's: again with them stowed
        try:
            converted = convert(model)
            put_back(converted, list(constants))  # tensors made in forward: the trace kept them on its root
            if graph is None:
                cap = trace_as_called(converted, sample_args, sample_kwargs, trace_maps=maps)
                gm, traced_writes = cap.gm, cap.traced_writes
            else:
                cap, gm = None, torch.fx.GraphModule(converted, copy.deepcopy(graph), type(converted).__name__)
        except TraceError as e:  # (the audit records such a model from an eager run; a repair rewrites a graph)
            raise ConversionError(f"repair needs a torch.fx-traceable model: {e.plain}") from e
        except Exception as e:
            raise ConversionError(f"repair needs a torch.fx-traceable model: {e}") from e
        if read_through(gm.graph):  # views forward makes of buffers, read through them (the model's state)
            gm = torch.fx.GraphModule(converted, gm.graph, type(converted).__name__)
        if keep_blocks(gm.graph, grads=grads):  # forward's no_grad and autocast blocks, which fx does not record
            gm.recompile()
        if cap is None and graph_checked:  # an audit's graph checked against eager; others are checked here
            break
        current = None
        if any(in_place_operator(n.target) for n in gm.graph.nodes if n.op == "call_function"):
            with contextlib.suppress(Exception):  # (its run settles ``size //= 2`` out of place; the check decides)
                current = measure(gm, sample_args, sample_kwargs, bandwidth, baseline)
        try:
            check_trace(converted, gm, sample_args, sample_kwargs)
            break
        except ConversionError:
            if cap is None or not cap.maps_traced:
                raise
    naive = gm  # never rewritten: every rewrite is made on a copy
    if current is None:
        current = measure(gm, sample_args, sample_kwargs, bandwidth, baseline)
    records, analysis = current.records, current.analysis
    stepped = None if backward is None else with_backward(current, gm, sample_args, sample_kwargs, bandwidth, backward)
    before_bytes, before_breaks = (stepped or current).analysis.summary.bytes_moved, analysis.summary.breaks
    steps: list[RepairStep] = []
    refused: dict[tuple[str, str], str] = {}
    """(node, kind) -> why the candidate was dropped; a candidate that would have exposed a
    break is tried again on the next pass (another rewrite may have fixed that break)."""
    done: set[tuple[str, str]] = set()
    reference: dict[str, Any] = {}  # the original model's results, computed at the first check
    # the naive model raises at a break (a GraphModule prints its traceback on the way): not run
    runs = naive if before_breaks == 0 else None

    def remeasure(g: torch.fx.GraphModule, base: Measured, changed: Any) -> Measured:
        return measure(g, sample_args, sample_kwargs, bandwidth, baseline, base=base, changed=changed)

    for _ in range(max_passes):
        start = gm
        batch: list[tuple[Candidate, RepairStep]] = []
        tried: set[tuple[str, str]] = set()
        ordered: list[Candidate] | None = None
        while True:  # a rewrite kept can expose another (a chain of shuffles): tried in the same pass
            if ordered is None:
                ordered = sorted(candidates(gm, records, analysis), key=lambda c: PRIORITY.index(c.kind))
                seen = {(c.node, c.kind) for c in ordered}  # (what a no-gain rewrite exposes is not among them)
            cand = next((c for c in ordered if (c.node, c.kind) not in done and (c.node, c.kind) not in tried), None)
            if cand is None:
                break
            key = (cand.node, cand.kind)
            tried.add(key)
            trial = rewritable_copy(gm)
            try:
                _apply(trial, [cand], compile=False)
                changed = rewritten_nodes(trial, gm)
                t = measure(trial, sample_args, sample_kwargs, bandwidth, baseline, base=current, changed=changed)
                t_records, t_analysis = t.records, t.analysis
            except Exception as e:
                done.add(key)
                refused[key] = f"the rewrite failed: {first_line(e)}"
                continue
            before, after = analysis.summary, t_analysis.summary
            saved = before.bytes_moved - after.bytes_moved
            fixed_breaks = before.breaks - after.breaks
            fixed_latent = before.latent_breaks - after.latent_breaks
            if fixed_breaks < 0:
                refused[key] = f"it makes {-fixed_breaks} op(s) raise on channels_last input"
                continue
            if saved <= 0 and fixed_breaks <= 0 and fixed_latent <= 0:
                # alone it moves a revert on (a norm made to keep channels_last, a .contiguous() after it)
                pair = exposed_pair(cand, trial, t, seen, before, remeasure)
                if pair is None:
                    done.add(key)
                    refused[key] = "it removes no layout change, break or latent break"
                    continue
                cand, trial, t = pair
                t_records, t_analysis = t.records, t.analysis
                after = t_analysis.summary
                saved, fixed_breaks = before.bytes_moved - after.bytes_moved, before.breaks - after.breaks
            done.add(key)
            refused.pop(key, None)
            gm, current, records, analysis = trial, t, t_records, t_analysis
            batch.append((cand, RepairStep(cand.node, cand.kind, cand.reason, saved, fixed_breaks)))
            ordered = None
        if not batch:
            break
        # the pass's rewrites are checked against the original model together, once; only a
        # failing group is split, so a model whose rewrites all hold runs one check per pass
        kept = _checked(start, batch, lambda g: first_change(model, runs, g, samples, grads, reference), refused)
        if len(kept) < len(batch):
            gm = rewritable_copy(start)
            _apply(gm, [c for c, _ in kept], compile=False)
            current = measure(gm, sample_args, sample_kwargs, bandwidth, baseline)
            records, analysis = current.records, current.analysis
        steps.extend(step for _, step in kept)
        if not kept:
            break
    if gm is not naive:
        gm.recompile()  # the last copy measured (or kept when a check refused them all): no code yet
        # the log's figures from a whole run of the graph kept (its rewrites were measured in part)
        current = measure(gm, sample_args, sample_kwargs, bandwidth, baseline)
        records, analysis = current.records, current.analysis
    if backward is not None:  # a train audit's repair: its figures per training step (the naive graph's: stepped)
        current = (
            stepped
            if gm is naive and stepped is not None
            else with_backward(current, gm, sample_args, sample_kwargs, bandwidth, backward)
        )
        records, analysis = current.records, current.analysis
    wrote = traced_writes is None or len(traced_writes) > 0  # forward wrote a buffer while traced (None: not known)
    drift, counts = state_drift(converted, gm, samples) if model.training and wrote else (None, {})
    if drift:
        raise ConversionError(f"repair needs a graph that updates the model's state as it does in training: {drift}")
    mine, naive_dev, exact = deviations(model, runs, gm if steps else None, samples[0], grads, reference)

    def same(outlined: torch.fx.GraphModule) -> bool:  # (one run each: checkpointing changes no value)
        with quiet():
            flat, got = (res.outputs(res.fresh_copy(g), sample_args, sample_kwargs, grads) for g in (gm, outlined))
        return res.within(got, flat, res.ROUNDING, res.ELEMENTS)

    gm, checkpoints = with_checkpoints(gm, same)
    keep_state(gm, converted)  # (the graph's and the log's figures are made: state only)
    counted(gm, counts)
    log = RepairLog(
        steps=tuple(steps),
        bytes_before=before_bytes,
        bytes_after=analysis.summary.bytes_moved,
        breaks_before=before_breaks,
        breaks_after=analysis.summary.breaks,
        refused=tuple(f"{kind} at {node}: {why}" for (node, kind), why in refused.items()),
        records_after=tuple(records),
        summary_after=analysis.summary,
        deviation=mine,
        naive_deviation=naive_dev,
        exactness=exact,
        notes=tuple(n for n in (checkpoints, mode_note(model), _specialised(model, args, kwargs)) if n),
    )
    return gm, log


def _specialised(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The log's note on forward's parameters the sample left at their defaults: the graph is traced
    with those (:func:`~nhwc_audit.capture.defaults.defaults_left`) and takes no other."""
    left = defaults_left(model, args, kwargs)
    if not left:
        return None
    given = ", ".join(f"{k}={v!r}" for k, v in left.items())
    return f"the repaired graph is traced with forward's defaults the sample left ({given}): call it without them"
