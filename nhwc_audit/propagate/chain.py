"""The capture chain: torch.fx (checked against eager) -> torch.export -> eager hooks.

Each step that fails leaves a one-line reason; the report says which capture was used and
why the earlier ones were not. Layouts always come from running real tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from ..capture.fx import Capture, export, trace
from ..errors import PropagationError, SharedWeightWrite, TraceError, UsageError
from ..records import NodeRecord
from ..tensors import clone_value, first_line
from .eager import record_eager
from .interpreter import CopyRecorder, ProgressFn, _positional, propagate
from .replay import LeafCalls, replay

__all__ = ["CAPTURES", "Captured", "capture_and_propagate"]

CAPTURES = ("auto", "fx", "export", "hooks")


@dataclass(frozen=True)
class Captured:
    records: list[NodeRecord]
    method: str
    notes: tuple[str, ...]
    capture: Capture | None = None
    """The graph that was propagated (None for the hooks capture)."""
    flat_inputs: list[Any] | None = None
    """The values its placeholders took, in order."""

    @property
    def gm(self) -> torch.fx.GraphModule | None:
        return self.capture.gm if self.capture is not None else None


Ctx = Callable[[], contextlib.AbstractContextManager[Any]]


def _run_eager(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], seed: int, ctx: Ctx, shared: frozenset[int]
) -> Any:
    """One forward of ``model`` (or a captured graph) on clones of the sample, seeded, never
    writing to the ``shared`` weights (:class:`SharedWeightWrite`; ~10% of a resnet50
    forward at batch 1 when there are any)."""
    return _seeded(lambda: model(*tree_map(clone_value, args), **tree_map(clone_value, kwargs)), seed, ctx, shared)


def _seeded(fn: Callable[[], Any], seed: int, ctx: Ctx, shared: frozenset[int]) -> Any:
    guard = CopyRecorder(shared) if shared else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), torch.no_grad(), ctx(), guard:
        torch.manual_seed(seed)
        return fn()


def _replays(
    model: nn.Module,
    calls: LeafCalls,
    graph_out: Any,
    sample: tuple[tuple[Any, ...], dict[str, Any]],
    seed: int,
    ctx: Ctx,
    shared: frozenset[int],
) -> bool:
    """The replay check (:mod:`.replay`) of an fx capture whose propagation recorded ``calls``
    (of the whole batch, or of its first sample: then ``sample`` is that sample)."""
    args, kwargs = sample
    unsure = _seeded(
        lambda: replay(model, calls, tree_map(clone_value, args), tree_map(clone_value, kwargs), graph_out),
        seed,
        ctx,
        shared,
    )
    return unsure is None


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The sample's batch size when it is larger than 1 and clear (the leading dim of its
    4D/5D inputs, all equal), else None."""
    images = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() in (4, 5)]
    if not images or len({t.shape[0] for t in images}) != 1 or images[0].shape[0] <= 1:
        return None
    return int(images[0].shape[0])


def _batch_one(
    args: tuple[Any, ...], kwargs: dict[str, Any], batch: int | None
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The sample cut to its first item when it has a ``batch`` (:func:`_batch_of`; cut
    wherever a tensor has that leading dim), else None."""
    if batch is None:
        return None

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch:
            return v[:1].clone()  # clone keeps the channels_last strides of the slice's layout
        return v

    return tuple(tree_map(cut, a) for a in args), {k: tree_map(cut, v) for k, v in kwargs.items()}


def _same_outputs(a: Any, b: Any) -> str | None:
    """None when the outputs match, else a one-line difference."""
    ta = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor)]
    tb = [t for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(ta) != len(tb):
        return f"{len(ta)} output tensors where eager returns {len(tb)}"
    for i, (x, y) in enumerate(zip(ta, tb, strict=True)):
        if x.shape != y.shape:
            return f"output {i} has shape {tuple(x.shape)} where eager gives {tuple(y.shape)}"
        try:
            torch.testing.assert_close(x, y, equal_nan=True, check_stride=False)
        except AssertionError:
            diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else float("nan")
            return f"output {i} differs from eager (max abs diff {diff:.3g})"
    return None


def capture_and_propagate(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    method: str = "auto",
    verify: bool = True,
    progress: ProgressFn | None = None,
    autocast: torch.dtype | None = None,
    shared: frozenset[int] = frozenset(),
) -> Captured:
    """Capture ``model`` (the audit's private channels_last copy) and record every node's
    layouts on the sample. ``method`` forces one capture ('fx', 'export', 'hooks');
    ``autocast`` runs every execution under ``torch.autocast`` with that dtype; ``shared``
    are the storages of user weights the copy reads in place (every run of the model, the
    recorded ones and the eager checks, raises :class:`SharedWeightWrite` before writing to
    one)."""
    if method not in CAPTURES:
        raise UsageError(f"capture {method!r} is not one of: {', '.join(CAPTURES)}")
    notes: list[str] = []
    seed = 0
    device_type = next((t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), "cpu")

    def ctx() -> contextlib.AbstractContextManager[Any]:
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=autocast)

    eager_out: list[Any] = []

    def eager() -> Any:
        if not eager_out:
            eager_out.append(_run_eager(model, args, kwargs, seed, ctx, shared))
        return eager_out[0]

    def graph_step(name: str, capture: Callable[[], Any], flat: bool) -> Captured | None:
        def inputs_of(graph: torch.fx.Graph) -> list[Any]:
            return list(tree_leaves((args, kwargs))) if flat else _positional(graph, args, kwargs)

        try:
            cap = capture()
        except TraceError as e:
            if method == name:
                raise
            notes.append(f"{name}: {e}")
            return None
        checking = verify and method != name
        batch = _batch_of(args, kwargs) if checking and name == "fx" else None
        sliced = _batch_one(args, kwargs, batch)
        # fx graphs call leaf modules: record their calls so that a replay can check the graph
        # (a batch is recorded and replayed on its first sample)
        calls = LeafCalls(batch=batch) if checking and name == "fx" else None
        try:
            with torch.random.fork_rng(devices=[]), ctx():
                torch.manual_seed(seed)
                records, out = propagate(
                    cap.root,
                    tree_map(clone_value, args),
                    tree_map(clone_value, kwargs),
                    graph=cap.graph,
                    progress=progress,
                    flat_inputs=flat,
                    shared=shared,
                    leaf_calls=calls,
                )
        except PropagationError as e:
            try:
                eager()
            except SharedWeightWrite:
                raise
            except Exception as eager_error:
                same = str(e.__cause__) == str(eager_error) if e.__cause__ else False
                tail = (
                    "eager forward fails the same way"
                    if same
                    else f"eager forward fails too: {first_line(eager_error)}"
                )
                raise PropagationError(f"{e} ({tail})", node=e.node, node_format=e.node_format) from e
            if method == name:
                raise
            notes.append(f"{name}: the captured graph fails where eager runs: {e}")
            return None
        if checking:
            if any(r.error for r in records):
                # eager channels_last raises at the break too: nothing to compare against
                notes.append(f"{name}: not checked against eager (the model breaks on channels_last)")
                return Captured(records, name, tuple(notes), cap, inputs_of(cap.graph))
            if calls is not None:
                # eager with every leaf module call answered from a record of the graph's: the
                # cost of the model's Python instead of a forward; what it cannot vouch for goes on
                vouched = _replays(model, calls, out, sliced or (args, kwargs), seed, ctx, shared)
                calls = None  # let the recorded activations go
                if vouched:
                    return Captured(records, name, tuple(notes), cap, inputs_of(cap.graph))
            if sliced is not None:
                # fx graphs are not specialised to shapes: checking fidelity on one sample of the
                # batch costs 2/B of a forward instead of one forward (falls back to the full
                # batch when either side cannot run at batch 1, e.g. train-mode BatchNorm on 1x1)
                try:
                    small_graph = _run_eager(cap.gm, sliced[0], sliced[1], seed, ctx, shared)
                    small_eager = _run_eager(model, sliced[0], sliced[1], seed, ctx, shared)
                except SharedWeightWrite:
                    raise
                except Exception:
                    sliced = None
                else:
                    diff = _same_outputs(small_graph, small_eager)
                    if diff is not None:
                        notes.append(f"{name}: the captured graph does not reproduce eager: {diff}")
                        return None
                    return Captured(records, name, tuple(notes), cap, inputs_of(cap.graph))
            try:
                reference = eager()
            except SharedWeightWrite:
                raise
            except Exception as e:
                notes.append(f"{name}: not checked against eager (eager raised {first_line(e)})")
                return Captured(records, name, tuple(notes), cap, inputs_of(cap.graph))
            diff = _same_outputs(out, reference)
            if diff is not None:
                notes.append(f"{name}: the captured graph does not reproduce eager: {diff}")
                return None
        return Captured(records, name, tuple(notes), cap, inputs_of(cap.graph))

    if method in ("auto", "fx"):
        got = graph_step("fx", lambda: trace(model), flat=False)
        if got is not None:
            return got
    if method in ("auto", "export"):
        got = graph_step("export", lambda: export(model, args, kwargs), flat=True)
        if got is not None:
            return got
    try:
        with ctx():
            records, _, _ = record_eager(
                model, tree_map(clone_value, args), tree_map(clone_value, kwargs), shared=shared
            )
    except SharedWeightWrite:
        raise
    except Exception as e:
        reasons = "; ".join(notes)
        raise PropagationError(
            f"the model's forward raised {first_line(e)} when run eagerly on the channels_last sample: the model's "
            f"own error at the audited shapes, not a channels_last problem"
            + (f" (earlier captures: {reasons})" if reasons else "")
        ) from e
    return Captured(records=records, method="hooks", notes=tuple(notes))
