"""The capture chain: torch.fx (checked against eager), then the eager recording (torch.export before it when a graph is needed).

Each step that fails leaves a one-line note and the next one runs; the result says which
capture was used, how it was checked, and why the earlier ones were not used. Real and fake
audits share this chain: a :class:`Runner` says how every run of the model executes (seed,
autocast, the guard on shared weights, FakeTensorMode). Layouts always come from running
tensors (real ones, or FakeTensors in fake mode), never from a graph's metadata.

A failure of the audit's own machinery while checking a capture (a comparison that cannot be
made, a check that raises) fails that capture, with a note; only the model raising on the
sample, eagerly, is the model's error.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves, tree_map

from ..capture.defaults import trace_as_called
from ..capture.fx import Capture, GraphMethod
from ..capture.kept import graph_attributes, put_back
from ..errors import PropagationError, TraceError, UsageError, first_line
from ..prepare.fake import fake_plain
from ..records import CaptureMethod, NodeRecord
from ..tensors import clone_value, detached, iter_tensors
from .backward import GradRun
from .captured import Captured, CheckKind, Verdict, own_error
from .corrections import Corrections
from .eager import record_eager
from .exported import exported
from .grad_hooks import Grads
from .inputs import positional_inputs
from .interpreter import ProgressFn, propagate
from .module_state import attributes_restored
from .replay import replay
from .runner import Runner, StateKept, batch_of, first_sample, nchw_error, quiet
from .skeleton import Skeleton

__all__ = ["CAPTURES", "CaptureMethod", "Captured", "CheckKind", "capture_and_propagate", "replay_check"]

CAPTURES: tuple[CaptureMethod, ...] = get_args(CaptureMethod)


def replay_check(
    cap: Capture, skeleton: Skeleton, args: tuple[Any, ...], kwargs: dict[str, Any], runner: Runner
) -> str | None:
    """The replay check (:mod:`.replay`) of an fx capture whose propagation of the sample
    (``args``, ``kwargs``) left ``skeleton``: None when the replay vouches for the graph, else why not."""
    placeholders = [str(n.name) for n in cap.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, positional_inputs(cap.graph, args, kwargs), strict=True))
    with attributes_restored(cap.root), runner.context(), runner.grad_mode():  # what forward caches goes
        return replay(cap.root, cap.graph, skeleton, inputs, args, kwargs)


@dataclass
class _Chain:
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    method: CaptureMethod
    verify: bool
    progress: ProgressFn | None
    runner: Runner
    need_graph: bool = False
    notes: list[str] = field(default_factory=list)
    _eager: list[Any] = field(default_factory=list)

    def _noted(self, corrections: Corrections | None) -> frozenset[str]:
        """Note the corrections of a fake run; the nodes corrected."""
        if corrections is None:
            return frozenset()
        if (note := corrections.note()) is not None:
            self.notes.append(note)
        return frozenset(node for node, _ in corrections.applied)

    def _fake_constants(self, root: nn.Module, constants: list[tuple[str, Any]]) -> None:
        """Make the graph's real tensor constants (``torch.ones(...)`` in forward) on ``root``
        fake: a fake run cannot mix real tensors in."""
        for target, value in constants:
            if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
                owner, _, name = target.rpartition(".")
                fake = fake_plain(value, self.runner.fake_mode, value.device)
                setattr(root.get_submodule(owner) if owner else root, name, fake)

    def run(self) -> Captured:
        """fx first (a graph, checked against eager); after it fails, the eager recording, which
        sees what eager runs in one forward (torch.export costs 1-2.5 s before anything runs
        and finds the same), unless a graph is needed (``need_graph``: a backward pass), when
        torch.export comes before it."""
        first: dict[str, Capture] = {}  # the first fx trace: did it trace 4D/5D buffers?
        r = self.runner
        steps: list[tuple[GraphMethod, Callable[[], Capture]]] = [
            ("fx", lambda: first.setdefault("fx", trace_as_called(self.model, self.args, self.kwargs))),
            # a graph that traced buffers is not the model's (``isinstance(buf, Tensor)`` is False
            # for a proxy): traced again with them stowed, as torch's Tracer does
            ("fx", lambda: trace_as_called(self.model, self.args, self.kwargs, trace_maps=False)),
            ("export", lambda: exported(self.model, self.args, self.kwargs, r.device_type, self.notes, r.amp())),
        ]
        for i, (name, capture) in enumerate(steps):
            if i == 1:
                if not (first and first["fx"].maps_traced):
                    continue
                self.notes.append("fx: traced again with its 4D/5D buffers stowed as constants, as torch.fx does")
            if self.method == name or (self.method == "auto" and (name == "fx" or self.need_graph)):
                got = self._graph_step(name, capture)
                if got is not None:
                    return got
                if self.runner.grad:  # a rejected run's autograd graph may sit in reference cycles
                    gc.collect()
        if self.method == "auto" and not self.need_graph:
            self.notes.append(
                "hooks: recorded from one eager forward (module hooks and every ATen op): torch.export is "
                "tried only when a graph is needed (train=True / --train)"
            )
        return self._hooks()

    def _eager_reference(self) -> Any:
        """One eager forward of the whole sample, run at most once per chain."""
        if not self._eager:
            self._eager.append(tree_map(detached, self.runner.forward(self.model, self.args, self.kwargs)))
        return self._eager[0]

    def _done(self, records: list[NodeRecord], cap: Capture, checked: CheckKind, **more: Any) -> Captured:
        """The capture kept; ``more``: :class:`Captured`'s ``corrected``, ``grad_run``, ``reordering``."""
        sample = (self.args, self.kwargs)
        inputs = list(tree_leaves(sample)) if cap.flat_inputs else positional_inputs(cap.graph, *sample)
        return Captured(records, cap.method, tuple(self.notes), checked, cap, inputs, **more)

    def _graph_step(self, name: GraphMethod, capture: Callable[[], Capture]) -> Captured | None:
        forced = self.method == name
        try:
            with attributes_restored(self.model) as cached:
                cap = capture()
                # the constants the tracer stored on the model for the graph's get_attr nodes
                # (``torch.tensor([...])`` in forward: ``_tensor_constant0``) stay
                constants = graph_attributes(cap)
            put_back(cap.root, constants)
            if self.runner.fake:  # made in forward while tracing, outside fake mode: real tensors
                self._fake_constants(cap.root, constants)
            if self.need_graph and name == "fx":
                cap.compiled()  # a backward runs it as a GraphModule: its code must compile
        except TraceError as e:
            if forced:  # the model's own error when eager raises too, NCHW copies as well (a shape it refuses)
                try:
                    self._eager_reference()
                except Exception as eager_error:
                    self._hooks()  # the model's own error where an op fails on NCHW copies too: raised
                    hint = "capture 'auto' (the default), 'fx' or 'hooks' report where the model breaks"
                    raise TraceError(
                        f"{e}: the model breaks on channels_last input ({first_line(eager_error)}); {hint}"
                    ) from e
                raise
            self.notes.append(f"{name}: {e}")
            return None
        if cached:
            self.notes.append(
                f"{name}: the model sets attributes on its modules in forward ({', '.join(sorted(cached)[:4])}"
                f"{', ...' if len(cached) > 4 else ''}): put back after the capture so that no later run reads them"
            )
        checking = self.verify and not forced and not self.runner.fake
        batch = batch_of(self.args, self.kwargs) if checking and name == "fx" else None
        # fx graphs call leaf modules: note the run's shape so that a replay can check the graph
        skeleton = Skeleton() if checking and name == "fx" else None
        corrections = self.runner.corrections()
        grads: Grads | None = Grads() if self.runner.grad and not self.runner.fake else None  # a backward starts there
        state, seen = StateKept(self.model if checking else None), set[str]()  # seen: ops that may reorder
        try:
            with self.runner.context(guard=False, corrections=corrections):
                records, out = propagate(
                    cap.root,
                    tree_map(clone_value, self.args),
                    tree_map(clone_value, self.kwargs),
                    graph=cap.graph,
                    progress=self.progress,
                    flat_inputs=cap.flat_inputs,
                    shared=self.runner.shared,
                    skeleton=skeleton,
                    corrections=corrections,
                    grad=self.runner.grad,
                    grads=grads,
                    reordering=seen,
                )
        except PropagationError as e:
            self._raise_if_eager_fails(e)
            cause = first_line(e.__cause__) if e.__cause__ is not None else str(e)
            wrong = (
                f"{name}: the captured graph is wrong: it raises {cause} at node {e.node!r} where the eager model runs"
            )
            if forced:  # not the model's error: the graph's (a branch of forward traced the other way)
                raise TraceError(f"{wrong}; audit with capture 'auto' or 'hooks', which record what eager runs") from e
            self.notes.append(wrong)
            state.undo()
            return None
        corrected = self._noted(corrections)
        more = {"grad_run": GradRun(out, grads) if grads is not None else None, "reordering": frozenset(seen)}
        if not checking:
            return self._done(records, cap, "off", corrected=corrected, **more)
        try:
            verdict = self._check(cap, records, out, skeleton, first_sample(self.args, self.kwargs, batch), state)
        except Exception as e:  # the check itself failed: the audit's problem, not the model's
            verdict = Verdict("unchecked", rejected=f"the check against eager raised {first_line(e)}")
        if verdict.rejected is not None:
            self.notes.append(f"{name}: {verdict.rejected}")
            state.undo()  # what its run wrote to the model's buffers goes with the capture
            return None
        if verdict.note is not None:
            self.notes.append(f"{name}: {verdict.note}")
        return self._done(records, cap, verdict.checked, **more)

    def _check(
        self,
        cap: Capture,
        records: list[NodeRecord],
        out: Any,
        skeleton: Skeleton | None,
        first: tuple[tuple[Any, ...], dict[str, Any]] | None,
        kept: StateKept,
    ) -> Verdict:
        """How the graph was checked, and whether it reproduces eager (each from the state the
        model's own writes to its weights left, ``kept``)."""
        if broken := next((r.name for r in records if r.error), None):
            try:  # eager channels_last raises at the break too (nothing to compare), or the graph is wrong
                with kept(), quiet():
                    self._eager_reference()
            except Exception:
                return Verdict("unchecked", note="not checked against eager (the model breaks on channels_last)")
            why = f"the graph breaks at node {broken!r} where the eager model runs channels_last (a branch traced"
            return Verdict("unchecked", rejected=f"{why} the other way: a test of a traced value, is_contiguous())")
        if skeleton is not None:
            # eager with every leaf module call answered by a stand-in of the graph's, every
            # other call on meta tensors: the cost of the model's Python instead of a forward;
            # what it cannot vouch for goes on to a forward
            if replay_check(cap, skeleton, self.args, self.kwargs, self.runner) is None:
                return Verdict("replay")
        if first is not None:
            # fx graphs are not specialised to shapes: checking on one sample of the batch costs
            # 2/B of a forward (the full batch decides when either side cannot run at batch 1,
            # e.g. train-mode BatchNorm on 1x1)
            try:
                with kept(), quiet():
                    small_graph = self.runner.forward(cap.gm, *first)
                with kept(), quiet():  # what the model warns of at batch 1 only (an out= resized)
                    small_eager = self.runner.forward(self.model, *first)
            except Exception:
                pass
            else:
                return Verdict.compared("sample", small_graph, small_eager)
        try:
            if kept.written:  # the propagation's run started from the state before its writes
                with kept(), quiet():
                    out = self.runner.forward(cap.gm, self.args, self.kwargs)
            with kept():
                reference = self._eager_reference()
        except Exception as e:
            return Verdict("unchecked", note=f"not checked against eager (eager raised {first_line(e)})")
        return Verdict.compared("eager", out, reference)

    def _raise_if_eager_fails(self, e: PropagationError) -> None:
        """The graph raised on the sample: when eager raises too, it is the model's error. Where eager
        channels_last raises otherwise (first at a break the graph ran past), the error quoted is the
        eager forward's as the model was built (NCHW), which is what the user's own run meets."""
        try:
            self._eager_reference()
        except Exception as eager_error:
            cause = str(e.__cause__) if e.__cause__ else None
            same = cause == str(eager_error)
            if not same and (nchw := nchw_error(self.runner, self.model, self.args, self.kwargs)) is not None:
                eager_error, same = nchw, cause == str(nchw)
            run = "eager forward on fake tensors" if self.runner.fake else "eager forward"  # (not the model's own)
            tail = f"{run} fails the same way" if same else f"{run} fails too: {first_line(eager_error)}"
            raise PropagationError(f"{e} ({tail})", node=e.node, node_format=e.node_format) from e

    def _hooks(self) -> Captured:
        corrections = self.runner.corrections()
        try:
            with self.runner.context(guard=False, corrections=corrections):
                records, _ = record_eager(
                    self.model,
                    tree_map(clone_value, self.args),
                    tree_map(clone_value, self.kwargs),
                    shared=self.runner.shared,
                    corrections=corrections,
                )
        except Exception as e:
            raise own_error(e, self.runner.fake, self.notes) from e
        self._noted(corrections)
        return Captured(records, "hooks", tuple(self.notes), "off")


def capture_and_propagate(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    method: CaptureMethod = "auto",
    verify: bool = True,
    progress: ProgressFn | None = None,
    runner: Runner | None = None,
    need_graph: bool = False,
) -> Captured:
    """Capture ``model`` (the audit's private channels_last copy, real or fake) and record
    every node's layouts on the sample. ``method`` forces one capture ('fx', 'export',
    'hooks'); ``verify`` checks an fx or export graph against eager (real mode only);
    ``runner`` says how the model runs (see :class:`Runner`; every run, the recorded ones and
    the checks, raises :class:`~nhwc_audit.errors.SharedWeightWrite` before writing to one of
    ``runner.shared``); ``need_graph`` (a backward pass follows) tries torch.export before the
    eager recording when fx fails."""
    if method not in CAPTURES:
        raise UsageError(f"capture {method!r} is not one of: {', '.join(CAPTURES)}")
    if runner is None:
        device = next((t.device.type for t in iter_tensors((args, kwargs))), "cpu")
        runner = Runner(device_type=device)
    return _Chain(model, args, kwargs, method, verify, progress, runner, need_graph).run()
