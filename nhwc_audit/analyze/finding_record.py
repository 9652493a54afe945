"""One finding's record, made from a node's (:func:`make_finding`): its bytes beyond the NCHW
baseline's, its hint rendered, where the NCHW input came from. The rules that decide which findings
a node has are :mod:`.findings`'."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..records import Finding, FindingKind, Layout, NodeRecord
from . import hint_keys as H
from . import moves
from .hint_render import hint_keys, render_hint
from .hints import HintTable
from .origin import describe, only_ambiguous_inputs, origin_of, via

__all__ = ["Ctx", "make_finding", "recomputed"]


@dataclass(frozen=True)
class Ctx:
    by_name: dict[str, NodeRecord]
    bandwidth: float
    hints: HintTable
    device: str
    free: frozenset[str]  # records the conversion leaves as they are (.origin.conversion_free)
    stored: frozenset[str] | None  # producers of the conv weights read as data (None: any left NCHW)
    ranks: frozenset[int] = frozenset({4})  # of the convolutions' outputs: 4 for 2D maps, 5 for volumes


def make_finding(
    ctx: Ctx,
    r: NodeRecord,
    kind: FindingKind,
    *,
    layout_in: Layout,
    nbytes: int,
    producer: NodeRecord | None = None,
    shape: tuple[int, ...] | None = None,
    hint_op: str | None = None,
    detail: str | None = None,
    hidden: bool = False,
    intrinsic: bool = False,
) -> Finding:
    if shape is None:
        spatial = r.spatial_outputs
        shape = spatial[0].shape if spatial else (r.outputs[0].shape if r.outputs else ())
    origin = origin_of(producer, ctx.by_name)
    if moves.baselined(kind, hidden=hidden) and not intrinsic:  # what it moves in NCHW too is not channels_last's
        nbytes = max(0, nbytes - r.nchw_bytes)
    mixed_or_converted = kind in (FindingKind.CONVERSION, FindingKind.MIXED)
    if mixed_or_converted and origin is not None and only_ambiguous_inputs(origin):
        hint_op = H.AMBIGUOUS_ORIGIN
    return Finding(
        node=r.name,
        index=r.index,
        kind=kind,
        op=r.site_op,
        target=r.target,
        module_path=r.module_path,
        module_type=r.module_type,
        source=r.source,
        layout_in=layout_in,
        layout_out=r.output_layout,
        shape=shape,
        detail=r.detail,
        bytes=nbytes,
        est_seconds=nbytes / ctx.bandwidth if ctx.bandwidth > 0 else 0.0,
        hint=render_hint(
            ctx.hints,
            kind,
            hint_keys(r) if hint_op is None else hint_op,
            op=r.site_op,
            origin=via(origin, producer) or _unnamed(r, hint_op),
            device=ctx.device,
            detail=detail if detail is not None else (r.detail or None),
            rank=len(shape) if len(shape) in ctx.ranks else min(ctx.ranks),  # a channel shuffle's 5D view: a map's
        ),
        producer=producer.name if producer else None,
        origin=origin.name if origin else None,
        origin_op=describe(origin) if origin else None,
        error=r.error,
        intrinsic=intrinsic,
    )


def _unnamed(r: NodeRecord, hint_op: str | None) -> str | None:
    """What a hint says of a stored tensor no node names (the eager capture records none for a
    parameter or buffer an op reads): where it is read."""
    if hint_op != H.STORED_OPERAND:
        return None
    return f"unnamed in this capture; read in {r.module_path or 'the top module'} ({r.module_type})"


def recomputed(r: NodeRecord, findings: Sequence[Finding]) -> list[Finding]:
    """``findings`` of ``r``'s forward counted every time a training step runs it: the backward
    recomputes the function of each ``torch.utils.checkpoint`` around the node
    (:attr:`NodeRecord.recomputed`), and with it the copy."""
    times = 1 + r.recomputed
    if times == 1:
        return list(findings)
    why = f"; paid {times} times a training step (torch.utils.checkpoint recomputes this block's forward in backward)"
    return [
        dataclasses.replace(
            f, bytes=f.bytes * times, est_seconds=f.est_seconds * times, recomputed=r.recomputed, hint=f.hint + why
        )
        if f.bytes
        else f
        for f in findings
    ]
