"""What the findings add up to: NCHW regions (networkx), ranked hotspots, fixes grouped by the
root cause to change, and the summary. Pure functions over records; :func:`analyze` runs the
whole analyze stage.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass

import networkx as nx

from ..records import Finding, FindingKind, Fix, Hotspot, Layout, NodeRecord, Region, SourceLoc, Summary
from .findings import find_findings
from .gradient_roots import backward_shares, root_of
from .hints import HintTable
from .origin import SKIP_OPS, build_graph

__all__ = [
    "Analysis",
    "activation_bytes",
    "analyze",
    "share_ops",
    "find_regions",
    "group_fixes",
    "rank_hotspots",
    "summarize",
]


def find_regions(records: Sequence[NodeRecord], findings: Sequence[Finding]) -> list[Region]:
    """Connected runs of nodes executing in NCHW that start at a revert, mixed op or break, or at an op
    that makes an NCHW map from no map (a matmul's result viewed as one) converted later.

    Nodes that are NCHW only because they view a channels_last tensor in another order
    (ConvNeXt's permute to N, H, W, C) start at no finding and form no region. The dataflow
    graph is built over the NCHW nodes only, and only when some finding starts a region.
    """
    by_name = {r.name: r for r in records}
    starters = {f.node for f in findings if f.kind is not FindingKind.CONVERSION and f.layout_out is Layout.CONTIGUOUS}
    # a map made NCHW from values of fewer dims (a matmul's result viewed as a map) and converted later
    starters |= {
        f.origin for f in findings if f.kind is FindingKind.CONVERSION and f.origin and _enters(by_name.get(f.origin))
    }
    if not starters:
        return []
    conversions = {f.node for f in findings if f.kind is FindingKind.CONVERSION}
    sub = build_graph([r for r in records if r.op not in SKIP_OPS and r.output_layout is Layout.CONTIGUOUS])
    regions: list[Region] = []
    comps = [sorted(c, key=lambda n: by_name[n].index) for c in nx.weakly_connected_components(sub)]
    comps.sort(key=lambda c: by_name[c[0]].index)
    for comp in comps:
        entries = tuple(n for n in comp if n in starters)
        if not entries:
            continue
        exits = sorted(
            {u for n in comp for u in by_name[n].users if u in conversions and u not in comp},
            key=lambda n: by_name[n].index,
        )
        nbytes = sum(o.nbytes for n in comp for o in by_name[n].spatial_outputs)
        regions.append(
            Region(id=len(regions) + 1, nodes=tuple(comp), entries=entries, exits=tuple(exits), bytes=nbytes)
        )
    return regions


def _enters(r: NodeRecord | None) -> bool:
    """``r`` makes an NCHW map from no map (a view of a matmul's result): where an NCHW region starts."""
    if r is None or r.op in SKIP_OPS or r.output_layout is not Layout.CONTIGUOUS:
        return False
    return bool(r.spatial_outputs) and not r.spatial_inputs


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
    by_node: dict[str, Finding] = {}  # a node's forward finding, where it has one beside its backward's
    for f in findings:
        if (f.node not in by_node or by_node[f.node].kind is FindingKind.BACKWARD) and not f.intrinsic:
            by_node[f.node] = f
    groups: dict[tuple[str, ...], list[tuple[Finding, int]]] = {}  # (a finding, its bytes this change removes)
    roots: dict[tuple[str, ...], list[str]] = {}
    sources: dict[tuple[str, ...], SourceLoc | None] = {}
    forward = {n: f for n, f in by_node.items() if f.kind is not FindingKind.BACKWARD}
    for f in findings:
        backward = f.kind is FindingKind.BACKWARD and not f.intrinsic
        for root_name, nbytes in backward_shares(f, forward, by_name) if backward else [(root_of(f), f.bytes)]:
            root = by_name[root_name]
            if root.in_leaf_module:
                key: tuple[str, ...] = ("module", root.module_type)
            else:
                key = ("site", root.op_label, root.location)
                sources[key] = root.source
            key += ("intrinsic",) if f.intrinsic else ()  # a cost no change removes: apart from the changes
            groups.setdefault(key, []).append((f, nbytes))
            names = roots.setdefault(key, [])
            if root_name not in names:
                names.append(root_name)
    fixes = []
    for key, shares in groups.items():
        fs = [f for f, _ in shares]
        root_findings = [by_node[n] for n in roots[key] if n in by_node and key[-1] != "intrinsic"]
        lead = root_findings[0] if root_findings else fs[0]
        latent = [f for f in fs if f.kind is FindingKind.LATENT and f is not lead]
        hint = lead.hint
        if latent:
            where = ", ".join(f"{f.op} at {f.location or f.node}" for f in latent[:3])
            hint += f"; fix together with {len(latent)} op(s) that raise once this stays channels_last ({where})"
        fixes.append(
            Fix(
                kind=lead.kind,
                op=key[1],
                source=sources.get(key),
                hint=hint,
                roots=tuple(sorted(roots[key], key=lambda n: by_name[n].index)),
                findings=len(fs),
                bytes=sum(nbytes for _, nbytes in shares),
            )
        )
    fixes.sort(key=lambda x: (x.kind is not FindingKind.BREAK, -x.bytes, x.op, str(x.source), x.roots))
    return fixes


def _counts(r: NodeRecord) -> bool:
    return r.op not in SKIP_OPS and r.output_layout in (Layout.CHANNELS_LAST, Layout.CONTIGUOUS, Layout.STRIDED)


def share_ops(records: Iterable[NodeRecord]) -> list[NodeRecord]:
    """The ops the channels_last share is taken over: ops (not inputs, weights or the output)
    whose output is a spatial activation in a definite layout; of the ATen ops one call of the
    model dispatched (eager capture: InstanceNorm's copy, view, batch norm and view back), only
    the last one, as a graph has one node for the call, so that the share does not depend on the
    capture (a flatten's copy of an NHWC map, then its view to 2D: the call's result is not
    spatial, and nothing counts, as in a graph)."""
    records = list(records)
    last = {r.call: r.name for r in records if r.call is not None}  # a call's result: its last op
    return [r for r in records if _counts(r) and (r.call is None or last[r.call] == r.name)]


def activation_bytes(spatial: Iterable[NodeRecord], in_regions: Container[str]) -> tuple[int, int]:
    """(all, NCHW) spatial output bytes of ``spatial`` (ops of :func:`share_ops`): an op
    runs NCHW when it lies in an NCHW region."""
    total = nchw = 0
    for r in spatial:
        n = sum(o.nbytes for o in r.spatial_outputs)
        total += n
        nchw += n if r.name in in_regions else 0
    return total, nchw


def summarize(
    records: Sequence[NodeRecord], findings: Sequence[Finding], regions: Sequence[Region], *, bandwidth: float
) -> Summary:
    """Headline numbers."""
    spatial = share_ops(records)
    in_regions = {n for reg in regions for n in reg.nodes}
    spatial_bytes, nchw_bytes = activation_bytes(spatial, in_regions)
    # per kind, a kernel's own copies apart (:attr:`Summary.intrinsic`)
    count = {k: sum(1 for f in findings if f.kind is k and not f.intrinsic) for k in FindingKind}
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
        latent_breaks=count[FindingKind.LATENT],
        backward=count[FindingKind.BACKWARD],
        bytes_moved=moved,
        est_seconds=moved / bandwidth if bandwidth > 0 else 0.0,
        trained=any(r.grads for r in records),
        intrinsic=sum(1 for f in findings if f.intrinsic),
        intrinsic_bytes=sum(f.bytes for f in findings if f.intrinsic),
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
    records: Sequence[NodeRecord],
    *,
    bandwidth: float,
    device: str = "cpu",
    hints: HintTable | None = None,
    findings: Sequence[Finding] | None = None,
) -> Analysis:
    """All of the above in one call (``findings``: :func:`find_findings` of ``records`` with
    the same settings, when the caller already has them)."""
    if findings is None:
        findings = find_findings(records, bandwidth=bandwidth, device=device, hints=hints)
    regions = find_regions(records, findings)
    return Analysis(
        findings=tuple(findings),
        fixes=tuple(group_fixes(records, findings)),
        regions=tuple(regions),
        hotspots=tuple(rank_hotspots(findings)),
        summary=summarize(records, findings, regions, bandwidth=bandwidth),
    )
