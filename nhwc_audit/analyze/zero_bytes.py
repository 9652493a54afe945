"""Which 0 B reverts are findings: a copy the NCHW model makes too (the same copy in either layout,
charged nothing) is one only where its output flows on as NCHW to a convolution or to a finding that
moves data, as the start of an NCHW region the conversions after it come from. Elsewhere it changes
nothing (attention scores copied by a softmax in both layouts, an elementwise op that follows its
permuted first operand: its output is in that operand's order, not NCHW)."""

from __future__ import annotations

from collections.abc import Sequence

from ..layout import channels_innermost
from ..records import Finding, FindingKind, NodeInput, NodeRecord

__all__ = ["leading_to", "without_idle_reverts"]


def without_idle_reverts(
    findings: Sequence[Finding], records: Sequence[NodeRecord], by_name: dict[str, NodeRecord]
) -> list[Finding]:
    """``findings`` less the 0 B reverts from which no NCHW tensor flows to a convolution or to
    another finding (:func:`leading_to`); ``by_name``: ``records`` by name."""
    kept = [bool(f.bytes) or f.kind is not FindingKind.REVERT for f in findings]
    if all(kept):
        return list(findings)
    convs = {r.name for r in records if r.convolves}
    targets = leading_to(records, {f.node for f, k in zip(findings, kept, strict=True) if k} | convs)
    return [f for f, k in zip(findings, kept, strict=True) if k or _flows_to(by_name[f.node], targets, by_name)]


def leading_to(records: Sequence[NodeRecord], targets: set[str]) -> set[str]:
    """The nodes with a path of data flow to one of ``targets`` along tensors that are not channels_last
    nor a view of one in another order (their channels innermost: an elementwise op's output following
    a permuted view of a map), ``targets`` included, whatever the capture's granularity (one reshape
    node, or a copy and views)."""
    producers = {r.name: [i.producer for i in r.inputs if i.producer and _nchw_path(i)] for r in records}
    found: set[str] = set()
    stack = list(targets)
    while stack:
        name = stack.pop()
        if name not in found:
            found.add(name)
            stack.extend(producers.get(name, ()))
    return found


def _flows_to(r: NodeRecord, targets: set[str], by_name: dict[str, NodeRecord]) -> bool:
    """A user of ``r`` in ``targets`` reads ``r``'s output along an NCHW path."""
    users = [by_name[u] for u in r.users if u in targets and u in by_name]
    return any(i.producer == r.name and _nchw_path(i) for u in users for i in u.inputs)


def _nchw_path(i: NodeInput) -> bool:
    """``i`` is no channels_last tensor, nor a view of one in another order (channels innermost)."""
    return not (i.meta.is_spatial and channels_innermost(i.meta))
