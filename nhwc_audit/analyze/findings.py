"""Analyze stage: pure functions from node records to findings, NCHW regions, hotspots
and a summary. No torch execution, no I/O.

The rules (one place each):

* break      the node raised on channels_last input (recorded by propagation).
* mixed      two full spatial activation inputs disagree (one channels_last, one NCHW).
* revert     a copy into row-major (NCHW) order of a tensor whose memory runs along the
             channels: a channels_last input and an NCHW output, or any rank >= 4 view of
             an NHWC tensor made contiguous (channel shuffle's 5D ``.contiguous()``).
* conversion an NCHW input, a channels_last output, data moved (e.g. a conv whose
             channels_last weights make it re-adopt NHWC from an NCHW input); or a node
             whose own layouts look fine but that transposed data internally (copies seen
             at ATen level while it ran, e.g. a conv with padding_mode='circular').

A node whose output aliases an input (a view such as ``permute``, an in-place op) moves
no data and is never a revert or a conversion; ambiguous tensors (C == 1, H == W == 1)
decide nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx

from ..layout import channels_innermost, leans_channels_last, row_major
from ..records import (
    Finding,
    FindingKind,
    Fix,
    Hotspot,
    Layout,
    NodeRecord,
    Region,
    SourceLoc,
    Summary,
)
from .hints import AMBIGUOUS_ORIGIN, HIDDEN, ND_TRANSPOSE, HintTable, default_hints, render_hint

__all__ = [
    "Analysis",
    "analyze",
    "build_graph",
    "find_findings",
    "find_regions",
    "group_fixes",
    "rank_hotspots",
    "summarize",
]

_SKIP_OPS = ("placeholder", "get_attr", "output")
_DECIDED = (Layout.CHANNELS_LAST, Layout.CONTIGUOUS)


def build_graph(records: Sequence[NodeRecord]) -> nx.DiGraph[str]:
    """The dataflow graph: one node per record (keyed by name), edges producer -> user."""
    g: nx.DiGraph[str] = nx.DiGraph()
    for r in records:
        g.add_node(r.name, index=r.index)
    for r in records:
        for u in r.users:
            g.add_edge(r.name, u)
    return g


@dataclass(frozen=True)
class _Ctx:
    by_name: dict[str, NodeRecord]
    bandwidth: float
    hints: HintTable
    device: str


def _finding(
    ctx: _Ctx,
    r: NodeRecord,
    kind: FindingKind,
    *,
    layout_in: Layout,
    nbytes: int,
    producer: NodeRecord | None = None,
    shape: tuple[int, ...] | None = None,
    hint_op: str | None = None,
    detail: str | None = None,
) -> Finding:
    if shape is None:
        spatial = r.spatial_outputs
        shape = spatial[0].shape if spatial else (r.outputs[0].shape if r.outputs else ())
    origin = _origin(producer, ctx.by_name)
    if kind is FindingKind.CONVERSION and origin is not None and _only_ambiguous_inputs(origin):
        hint_op = AMBIGUOUS_ORIGIN
    return Finding(
        node=r.name,
        index=r.index,
        kind=kind,
        op=r.op_name,
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
            _hint_keys(r) if hint_op is None else hint_op,
            op=r.module_type if r.in_leaf_module and r.op != "call_module" else r.op_name,
            origin=_via(origin, producer),
            device=ctx.device,
            detail=detail if detail is not None else (r.detail or None),
        ),
        producer=producer.name if producer else None,
        origin=origin.name if origin else None,
        origin_op=_describe(origin) if origin else None,
        error=r.error,
    )


_OWN_HINT_ONLY = ("conv", "convtranspose")


def _hint_keys(r: NodeRecord) -> tuple[str, ...]:
    """The op's own name, then (for an ATen op inside a torch.nn leaf module, as export and
    hooks captures record them) the module type, so InstanceNorm2d's internal clone gets the
    InstanceNorm hint. Conv modules are skipped: their hint is about the conv kernel only."""
    if r.in_leaf_module and not r.module_type.lower().startswith(_OWN_HINT_ONLY):
        return (r.op_name, r.module_type)
    return (r.op_name,)


def _only_ambiguous_inputs(r: NodeRecord) -> bool:
    """The node made NCHW out of ambiguous input only (C == 1 or H == W == 1 tensors)."""
    ins = r.spatial_inputs
    return bool(ins) and all(i.meta.layout is Layout.AMBIGUOUS for i in ins)


def _origin(start: NodeRecord | None, by_name: dict[str, NodeRecord]) -> NodeRecord | None:
    """Walk back from an NCHW tensor's producer to the node where NCHW started: the first
    node (following each node's first NCHW activation input) that did not get NCHW input."""
    r = start
    seen: set[str] = set()
    while r is not None and r.name not in seen:
        seen.add(r.name)
        nchw = [i for i in r.spatial_inputs if i.meta.layout is Layout.CONTIGUOUS]
        if not nchw or r.op == "placeholder":
            return r
        nxt = by_name.get(nchw[0].producer or "")
        if nxt is None or nxt.op in _SKIP_OPS:
            return r
        r = nxt
    return r


def _via(origin: NodeRecord | None, producer: NodeRecord | None) -> str | None:
    if origin is None:
        return None
    text = f"{origin.name} ({_describe(origin)})"
    if producer is not None and producer.name != origin.name:
        text += f", via {producer.name}"
    return text


def _describe(r: NodeRecord) -> str:
    op = r.op_label
    return f"{op} at {r.location}" if r.location else op


def _node_findings(ctx: _Ctx, r: NodeRecord) -> list[Finding]:
    return _forward_findings(ctx, r) + _backward_findings(ctx, r)


def _backward_findings(ctx: _Ctx, r: NodeRecord) -> list[Finding]:
    """A channels_last activation whose gradient arrives NCHW (recorded with train=True)."""
    if not (r.grads and r.output_layout is Layout.CHANNELS_LAST):
        return []
    nchw_grads = [g for g in r.grads if row_major(g)]
    if not nchw_grads:
        return []
    users = ", ".join(sorted({ctx.by_name[u].op_name for u in r.users if u in ctx.by_name})) or "?"
    return [
        _finding(
            ctx,
            r,
            FindingKind.BACKWARD,
            layout_in=Layout.CHANNELS_LAST,
            nbytes=2 * sum(g.nbytes for g in nchw_grads),
            shape=nchw_grads[0].shape,
            detail=users,
        )
    ]


def _forward_findings(ctx: _Ctx, r: NodeRecord) -> list[Finding]:
    if r.error is not None:
        return [_finding(ctx, r, FindingKind.BREAK, layout_in=_first_decided(r), nbytes=0)]
    if r.aliases_input:
        return []
    ins = [i for i in r.spatial_inputs if i.meta.layout in _DECIDED]
    out = r.output_layout
    cl_in = [i for i in ins if i.meta.layout is Layout.CHANNELS_LAST]
    nchw_in = [i for i in ins if i.meta.layout is Layout.CONTIGUOUS]
    if cl_in and nchw_in:
        losers = nchw_in if out is Layout.CHANNELS_LAST else cl_in
        return [
            _finding(
                ctx,
                r,
                FindingKind.MIXED,
                layout_in=Layout.CHANNELS_LAST if out is Layout.CONTIGUOUS else Layout.CONTIGUOUS,
                nbytes=2 * sum(i.meta.nbytes for i in losers),
                producer=ctx.by_name.get(nchw_in[0].producer or ""),
                shape=losers[0].meta.shape,
                # op-specific mixed hints explain an NCHW first operand; else the generic one
                hint_op=None if out is Layout.CONTIGUOUS else "",
            )
        ]
    reverted = [o for o in r.outputs if row_major(o)]
    # an ambiguous input counts when its strides lean channels_last (kernels follow them):
    # e.g. a C == 1 volume into a CPU Conv3d that picks NCDHW for small inputs
    sources = [i for i in r.activation_inputs if channels_innermost(i.meta) or leans_channels_last(i.meta)]
    if reverted and sources:
        nbytes = 2 * sum(o.nbytes for o in reverted)
        standard = sources[0].meta.layout is Layout.CHANNELS_LAST and reverted[0].is_spatial
        return [
            _finding(
                ctx,
                r,
                FindingKind.REVERT,
                layout_in=sources[0].meta.layout,
                nbytes=nbytes,
                shape=reverted[0].shape,
                hint_op=None if standard else ND_TRANSPOSE,
            )
        ]
    if nchw_in and out is Layout.CHANNELS_LAST:
        return [
            _finding(
                ctx,
                r,
                FindingKind.CONVERSION,
                layout_in=Layout.CONTIGUOUS,
                nbytes=2 * sum(i.meta.nbytes for i in nchw_in),
                producer=ctx.by_name.get(nchw_in[0].producer or ""),
                shape=nchw_in[0].meta.shape,
            )
        ]
    writes_in_place = not r.outputs and any(i.meta.rank >= 4 for i in r.activation_inputs)  # x[...] = y
    if r.hidden and (writes_in_place or any(o.rank >= 4 for o in r.outputs)):
        # the node left and re-entered NHWC internally: invisible in its input/output layouts
        # (exits to non-spatial outputs, like flatten before a classifier, are not findings)
        return [
            _finding(
                ctx,
                r,
                FindingKind.CONVERSION,
                layout_in=r.hidden[0].layout_in,
                nbytes=sum(h.bytes for h in r.hidden),
                shape=r.hidden[0].shape,
                hint_op=HIDDEN,
            )
        ]
    return []


def _first_decided(r: NodeRecord) -> Layout:
    for i in r.spatial_inputs:
        return i.meta.layout
    return Layout.NOT_SPATIAL


def find_findings(
    records: Sequence[NodeRecord],
    *,
    bandwidth: float,
    device: str = "cpu",
    hints: HintTable | None = None,
) -> list[Finding]:
    """Every finding, in graph order."""
    ctx = _Ctx(
        by_name={r.name: r for r in records},
        bandwidth=bandwidth,
        hints=hints if hints is not None else default_hints(),
        device=device,
    )
    out: list[Finding] = []
    for r in records:
        if r.op not in _SKIP_OPS:
            out.extend(_node_findings(ctx, r))
    return out


def find_regions(
    records: Sequence[NodeRecord], findings: Sequence[Finding], graph: nx.DiGraph[str] | None = None
) -> list[Region]:
    """Connected runs of nodes executing in NCHW that start at a revert, mixed op or break.

    Nodes that are NCHW only because they view a channels_last tensor in another order
    (ConvNeXt's permute to N, H, W, C) start at no finding and form no region.
    """
    g = graph if graph is not None else build_graph(records)
    by_name = {r.name: r for r in records}
    nchw = [r.name for r in records if r.op not in _SKIP_OPS and r.output_layout is Layout.CONTIGUOUS]
    starters = {
        f.node: f for f in findings if f.kind is not FindingKind.CONVERSION and f.layout_out is Layout.CONTIGUOUS
    }
    conversions = {f.node for f in findings if f.kind is FindingKind.CONVERSION}
    sub = g.subgraph(nchw)
    regions: list[Region] = []
    comps = [sorted(c, key=lambda n: by_name[n].index) for c in nx.weakly_connected_components(sub)]
    comps.sort(key=lambda c: by_name[c[0]].index)
    for comp in comps:
        entries = tuple(n for n in comp if n in starters)
        if not entries:
            continue
        exits = sorted(
            {u for n in comp for u in g.successors(n) if u in conversions and u not in comp},
            key=lambda n: by_name[n].index,
        )
        nbytes = sum(o.nbytes for n in comp for o in by_name[n].spatial_outputs)
        regions.append(
            Region(id=len(regions) + 1, nodes=tuple(comp), entries=entries, exits=tuple(exits), bytes=nbytes)
        )
    return regions


def rank_hotspots(findings: Sequence[Finding]) -> list[Hotspot]:
    """Findings that move data, by bytes descending, ties by node name."""
    moving = sorted((f for f in findings if f.bytes > 0), key=lambda f: (-f.bytes, f.node))
    total = sum(f.bytes for f in moving)
    return [Hotspot(rank=i + 1, finding=f, share=f.bytes / total) for i, f in enumerate(moving)]


def group_fixes(records: Sequence[NodeRecord], findings: Sequence[Finding]) -> list[Fix]:
    """Group findings by the change that removes them, costliest first (ties by op name).

    Each finding has a root: itself for breaks and reverts; for a conversion or mixed op,
    the node where its NCHW input started (``origin``), since fixing that removes it.
    Roots that are modules group by module type (replace every InstanceNorm2d); roots
    that are functions or methods group by op and source line (change that line).
    """
    by_name = {r.name: r for r in records}
    by_node = {f.node: f for f in findings}
    groups: dict[tuple[str, ...], list[Finding]] = {}
    roots: dict[tuple[str, ...], list[str]] = {}
    sources: dict[tuple[str, ...], SourceLoc | None] = {}
    for f in findings:
        root_name = f.origin if f.kind in (FindingKind.CONVERSION, FindingKind.MIXED) and f.origin else f.node
        root = by_name[root_name]
        if root.in_leaf_module:
            key: tuple[str, ...] = ("module", root.module_type)
        else:
            key = ("site", root.op_label, root.location)
            sources[key] = root.source
        groups.setdefault(key, []).append(f)
        names = roots.setdefault(key, [])
        if root_name not in names:
            names.append(root_name)
    fixes = []
    for key, fs in groups.items():
        root_findings = [by_node[n] for n in roots[key] if n in by_node]
        lead = root_findings[0] if root_findings else fs[0]
        fixes.append(
            Fix(
                kind=lead.kind,
                op=key[1],
                source=sources.get(key),
                hint=lead.hint,
                roots=tuple(sorted(roots[key], key=lambda n: by_name[n].index)),
                findings=len(fs),
                bytes=sum(f.bytes for f in fs),
            )
        )
    fixes.sort(key=lambda x: (x.kind is not FindingKind.BREAK, -x.bytes, x.op, str(x.source), x.roots))
    return fixes


def summarize(
    records: Sequence[NodeRecord], findings: Sequence[Finding], regions: Sequence[Region], *, bandwidth: float
) -> Summary:
    """Headline numbers."""
    spatial = [
        r
        for r in records
        if r.op not in _SKIP_OPS and r.output_layout in (Layout.CHANNELS_LAST, Layout.CONTIGUOUS, Layout.STRIDED)
    ]
    in_regions = {n for reg in regions for n in reg.nodes}
    spatial_bytes = sum(o.nbytes for r in spatial for o in r.spatial_outputs)
    nchw_bytes = sum(o.nbytes for r in spatial if r.name in in_regions for o in r.spatial_outputs)
    count = {k: sum(1 for f in findings if f.kind is k) for k in FindingKind}
    moved = sum(f.bytes for f in findings)
    return Summary(
        nodes=len(records),
        spatial_nodes=len(spatial),
        nchw_nodes=sum(1 for r in spatial if r.name in in_regions),
        spatial_bytes=spatial_bytes,
        nchw_bytes=nchw_bytes,
        reverts=count[FindingKind.REVERT],
        conversions=count[FindingKind.CONVERSION],
        mixed=count[FindingKind.MIXED],
        breaks=count[FindingKind.BREAK],
        backward=count[FindingKind.BACKWARD],
        bytes_moved=moved,
        est_seconds=moved / bandwidth if bandwidth > 0 else 0.0,
    )


@dataclass(frozen=True)
class Analysis:
    """Everything the analysis derives from the records."""

    findings: tuple[Finding, ...]
    fixes: tuple[Fix, ...]
    regions: tuple[Region, ...]
    hotspots: tuple[Hotspot, ...]
    summary: Summary


def analyze(
    records: Sequence[NodeRecord], *, bandwidth: float, device: str = "cpu", hints: HintTable | None = None
) -> Analysis:
    """All of the above in one call."""
    findings = find_findings(records, bandwidth=bandwidth, device=device, hints=hints)
    regions = find_regions(records, findings)
    return Analysis(
        findings=tuple(findings),
        fixes=tuple(group_fixes(records, findings)),
        regions=tuple(regions),
        hotspots=tuple(rank_hotspots(findings)),
        summary=summarize(records, findings, regions, bandwidth=bandwidth),
    )
