"""The stages that refine a capture's records before the analysis decides on them: one backward
pass (a train audit: the gradient layouts, and what each node's backward moves between layouts),
and the NCHW baseline (what the same nodes move, forward and backward, when the model runs as
built), so that each finding is charged only what channels_last adds."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .analyze.displaced import displaced, displaced_backward, unpaired
from .analyze.findings import find_findings, kernel_own
from .analyze.moves import baselined, moved_bytes
from .analyze.nchw_order import forward_keeps_nchw, reorders_dims
from .capture.blocks import checkpoint_note, custom_backward_note
from .propagate.backward import backward_layouts, param_grad_notes
from .propagate.backward_kernels import Call
from .propagate.baseline import match_nodes, nchw_backward, nchw_records, split_moves
from .propagate.chain import Captured
from .propagate.kernels import layout_dependent_backwards
from .propagate.nchw_kernels import asked, forward_inside
from .propagate.recompute import recompute_counts
from .propagate.runner import Runner
from .records import BACKWARD_NOT_AUDITED, Finding, FindingKind, Layout, NodeRecord

__all__ = [
    "NO_BACKWARD",
    "NchwPlan",
    "by_kernel",
    "reorders_dims",
    "with_backward",
    "with_nchw_backward",
    "with_nchw_baseline",
]


@dataclass(frozen=True)
class NchwPlan:
    """What the NCHW baseline of a backward needs (:func:`with_nchw_backward`): whether the model
    reorders dims (:func:`reorders_dims`: then a whole NCHW forward and backward), and else the
    NCHW counterparts of each node's convolution backward calls, to ask by their kernels
    (:mod:`.propagate.nchw_kernels`); None where one has none known (then the whole run too)."""

    reordering: bool
    kernels: Mapping[str, Sequence[Call]] | None = None


NO_BACKWARD = NchwPlan(reordering=False, kernels={})


def with_backward(captured: Captured, runner: Runner) -> tuple[list[NodeRecord], tuple[str, ...], NchwPlan]:
    """The records with the gradient layouts of one backward pass and the layout changes each
    node's backward made; notes on the parameter gradients' layouts and on kernels whose result
    depends on a gradient's layout; and what its NCHW baseline needs (:class:`NchwPlan`)."""
    if captured.gm is None:
        return (
            captured.records,
            (f"{BACKWARD_NOT_AUDITED} (the {captured.method} capture has no graph to run backward through)",),
            NO_BACKWARD,
        )
    if runner.absent_cuda:
        why = "torch's autograd engine runs a backward of CUDA tensors, fake ones too, on a CUDA device"
        return (
            captured.records,
            (f"{BACKWARD_NOT_AUDITED} ({why}: audit --train on a GPU, or with --device cpu)",),
            NO_BACKWARD,
        )
    breaks = frozenset(r.name for r in captured.records if r.error)
    corrections = runner.corrections()  # a fake run's backward kernels strided as eager's
    with runner.context(guard=False, corrections=corrections):
        ran = backward_layouts(
            captured.gm,
            captured.inputs or [],
            breaks=breaks,
            corrected=captured.corrected,
            ran=captured.grad_run,
            data=captured.unconverted,
        )

        def moving() -> set[str]:  # (before the NCHW baseline nets: never fewer)
            found = find_findings(captured.records, bandwidth=1.0, device=runner.device_type)
            return {f.node for f in found if f.bytes}

        again, uncounted = recompute_counts(captured.gm, captured.inputs or [], moving, breaks)
    records = [
        dataclasses.replace(
            r,
            grads=ran.layouts.get(r.name, ()),
            backward=tuple(ran.moved.get(r.name, ())),
            recomputed=again.get(r.name, 0),
        )
        for r in captured.records
    ]
    faults = layout_dependent_backwards(records, runner.device_type, fake=runner.fake)
    fixed = (f"backward: {n}",) if corrections is not None and (n := corrections.note()) else ()
    custom = tuple(
        n for n in (custom_backward_note(captured.gm.graph), checkpoint_note(captured.gm.graph), uncounted) if n
    )
    calls = {name: [c for c in node_calls if c is not None] for name, node_calls in ran.kernels.items()}
    known = all(c is not None for node_calls in ran.kernels.values() for c in node_calls)
    left = [t for name, t in captured.gm.named_buffers() if name in captured.unconverted]
    known = known and not any(t.dim() in (4, 5) and not t.is_contiguous() for t in left)  # (NCHW's run not all NCHW)
    return (
        records,
        param_grad_notes(ran.params) + faults + fixed + custom,
        NchwPlan(reorders_dims(captured.gm.graph, ran.reordering, records), calls if known else None),
    )


def with_nchw_backward(
    records: list[NodeRecord], captured: Captured, runner: Runner, plan: NchwPlan
) -> tuple[list[NodeRecord], tuple[str, ...]]:
    """The records with the bytes each node's backward also moves when the model runs NCHW, run
    only when some node's backward moved data and the model reorders dims (``plan.reordering``:
    :func:`reorders_dims`) or a convolution's backward copied (its kernel's copies depend on its
    shapes and backend, not on orders: the NCHW model's oneDNN kernel copies a small map's input
    gradient it computed channels_last; a grouped one on the slow backend each group's gradient):
    those convolutions asked alone where the model reorders no dims (:func:`by_kernel`), else the
    graph run forward and back as built; ``records`` itself otherwise; and a note when that netted something or could not run. A node's
    kernels' copies of what they made (``HiddenCopy.result``) net against the same node's in NCHW
    only; its other moves also against a copy displaced downstream."""
    ours = {r.name: split_moves(r.backward) for r in records if r.backward}
    kernels = any(c.op == "convolution_backward" for r in records for c in r.backward)
    if not ours or not (plan.reordering or kernels):
        return records, ()
    asked_alone = by_kernel(plan, runner)
    theirs = asked_alone if asked_alone is not None else nchw_backward(captured, runner)
    if isinstance(theirs, str):
        return records, (
            f"NCHW baseline of the backward: not run ({theirs}); each backward finding is charged its whole copy",
        )
    moved = {name: n for name, (n, _) in theirs.items()}
    both = {name: moved[name] for name in ours if moved.get(name)}
    relays = {name: n for name, (n, _) in ours.items() if n}
    both |= {k: both.get(k, 0) + n for k, n in displaced_backward(records, moved, relays).items()}
    inside = {name: theirs[name][1] for name in ours if name in theirs and theirs[name][1]}
    netted = both.keys() | inside.keys()
    if not netted:
        return records, ()
    more = sum(1 for name in netted if sum(theirs.get(name, (0, 0))) >= sum(ours[name]))
    out = [
        dataclasses.replace(r, nchw_backward_bytes=both.get(r.name, 0), nchw_backward_inside=inside.get(r.name, 0))
        if r.name in netted
        else r
        for r in records
    ]
    return out, (
        f"NCHW baseline of the backward: {len(netted)} node(s)' backward move data in NCHW too "
        f"({more} as much or more): charged only the bytes channels_last adds",
    )


def by_kernel(plan: NchwPlan, runner: Runner) -> dict[str, tuple[int, int]] | None:
    """Node -> what its convolutions' NCHW backward kernels copy inside (:func:`split_moves`), each
    call's NCHW counterpart asked by its kernel (:func:`~.propagate.nchw_kernels.asked`): the NCHW
    run's backward moves nothing else where the model reorders no dims (:func:`reorders_dims`).
    None where that needs the whole NCHW run (the model reorders dims, a call has no counterpart
    known, a kernel could not be asked)."""
    if plan.reordering or plan.kernels is None:
        return None
    copies = asked(plan.kernels, runner.fake_mode)
    return None if copies is None else {name: split_moves(c) for name, c in copies.items()}


def _kernels_asked(records: list[NodeRecord], captured: Captured, runner: Runner) -> list[NodeRecord] | None:
    """The records as an NCHW forward that moves nothing (:func:`~.analyze.nchw_order.forward_keeps_nchw`)
    leaves them: but the copies its convolutions' kernels make of their own, asked of each call's NCHW
    counterpart (:func:`~.propagate.nchw_kernels.forward_inside`), where channels_last's kernel copied
    too (``nchw_inside``, as the run's own records would give). None where one cannot be asked."""
    inside = [r for r in records if r.inside]
    asked = forward_inside(captured.capture.root, inside, runner) if inside and captured.capture else {}
    if asked is None:
        return None
    own = {}
    for r in inside:
        copies, meta = asked[r.name]
        if copies:  # (the NCHW run's record: its weight as that run reads it, its kernel's copies)
            ins = tuple(
                dataclasses.replace(i, meta=meta) if k == 1 and i.meta.shape == meta.shape else i
                for k, i in enumerate(r.inputs)
            )
            own[r.name] = sum(
                c.bytes for c in kernel_own(dataclasses.replace(r, inputs=ins, inside=tuple(copies)), Layout.CONTIGUOUS)
            )
    return [dataclasses.replace(r, nchw_inside=own[r.name]) if r.name in own else r for r in records]


def with_nchw_baseline(
    records: list[NodeRecord],
    findings: Sequence[Finding],
    captured: Captured,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    runner: Runner,
    *,
    fake: bool,
    device: str,
) -> tuple[list[NodeRecord], tuple[str, ...]]:
    """The records with the bytes each node also moves when the model runs NCHW (the same
    capture run as built, in the audit's mode; ``fake``: a real audit's on fake tensors), and
    notes saying what that changed; ``records`` itself when nothing changed. Run only when one of
    ``findings`` (theirs) that it can change moves data (:func:`~.analyze.moves.baselined`: a
    revert, a mixed op, a conversion, a layout change a node makes inside), and not where the NCHW
    forward moves nothing (:func:`~.analyze.nchw_order.forward_keeps_nchw`)."""
    hidden = {r.name for r in records if r.hidden}
    costly = [f for f in findings if baselined(f.kind, hidden=f.node in hidden) and f.bytes > 0]
    if not costly:
        return records, ()
    if forward_keeps_nchw(captured, records, handed=bool(runner.as_built)):
        planned = _kernels_asked(records, captured, runner)
        if planned is not None:
            return planned, ()
    nchw, on_fake = nchw_records(captured, module, args, kwargs, runner, fake=fake)
    if isinstance(nchw, str):
        return records, (f"NCHW baseline: not run ({nchw}); each finding is charged its whole copy",)
    # what each node moves in the NCHW run: a revert or a mixed op by the same rules (a LayerNorm2d
    # output added, NHWC-strided in either layout), a copy that reorders memory, a re-lay inside
    moved = {r.name: n for r in nchw if (n := moved_bytes(r))}
    # conv weights that are no parameters (a tensor constant, a plain attribute) are re-laid as built too
    graph = captured.capture.graph if captured.capture is not None and captured.method == "fx" else None
    made = captured.unconverted
    left = frozenset(n.name for n in graph.nodes if n.op == "get_attr" and n.target in made) if graph else frozenset()
    for f in find_findings(nchw, bandwidth=1.0, device=device, stored=left):
        if baselined(f.kind) and not f.intrinsic:  # (a kernel's own copies: netted as ``nchw_inside``)
            moved[f.node] = max(moved.get(f.node, 0), f.bytes)
    pairs = match_nodes(records, nchw, by_name=captured.capture is not None)
    both = {name: moved[theirs] for name, theirs in pairs.items() if theirs in moved}
    copied = {
        r.name: sum(c.bytes for c in kernel_own(r, Layout.CONTIGUOUS)) for r in nchw if r.inside
    }  # a conv kernel's own copies
    inside = {r.name for r in records if r.inside}
    own = {name: copied[theirs] for name, theirs in pairs.items() if theirs in copied and name in inside}
    charged = {f.node for f in costly}
    both |= {k: both.get(k, 0) + n for k, n in displaced(records, both, charged).items()}
    if captured.capture is None:  # the eager capture records only the ops a run makes: NCHW's copies of its own
        both |= {k: both.get(k, 0) + n for k, n in unpaired(nchw, pairs, moved, charged).items()}
    changed = captured.as_built[1]
    read = (
        f"NCHW baseline: the strides torch.export fixed from the channels_last sample ({', '.join(changed)}) "
        "read as the NCHW model reads its own",
    )
    if not both and not own:
        return records, read if changed else ()
    out = [
        dataclasses.replace(r, nchw_bytes=both.get(r.name, 0), nchw_inside=own.get(r.name, 0))
        if r.name in both or r.name in own
        else r
        for r in records
    ]
    notes = ["NCHW baseline: run on fake tensors (layouts only; the model's own run costs more)"] if on_fake else []
    for kind, what in (
        (FindingKind.REVERT, "revert(s) copy"),
        (FindingKind.MIXED, "mixed op(s) move data"),
        (FindingKind.CONVERSION, "conversion(s) re-lay data"),
    ):
        hit = [f for f in costly if f.kind is kind and f.node in both]
        if hit:
            notes.append(
                f"NCHW baseline: {len(hit)} {what} in NCHW too ({', '.join(sorted({f.op for f in hit}))}): "
                "charged only the bytes channels_last adds"
            )
    return out, tuple(notes) + (read if changed else ())
