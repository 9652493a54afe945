"""The module tree and the graph's data: every op grouped under the modules it ran in.

:func:`module_rows` gives one row per module the forward ran (like torchinfo's summary): type,
output, layout, the share of its activation bytes that stay channels_last, its findings and the
bytes they move. :func:`graph_data` is what the report's script lays out (with dagre) and draws:
ops, edges between them, and the modules they collapse into. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..analyze.analysis import activation_bytes, counts_for_share
from ..analyze.origin import SKIP_OPS
from ..records import Finding, FindingKind, NodeRecord, Region
from .text import fmt_bytes, fmt_share, short_source

__all__ = ["ModuleRow", "drawn", "graph_data", "module_rows"]

_CONTAINERS = frozenset({"Sequential", "ModuleList", "ModuleDict"})
"""Module types that run no op of their own: the graph opens them to show their children."""
_OPEN_LIMIT = 60
"""The graph opens containers only while it shows at most this many blocks and ops."""


@dataclass(frozen=True, slots=True)
class ModuleRow:
    """One module of the tree, with what its ops (its submodules' included) did."""

    path: str
    """Qualified name; ``''`` for the root."""
    name: str
    """The last part of the path (the class name for the root)."""
    type: str
    depth: int
    parent: str | None
    ops: int
    """Ops run inside it (inputs, weights and the output not counted)."""
    activation_bytes: int
    """Bytes of the spatial activations its ops wrote."""
    nchw_bytes: int
    """Of those, the bytes written in NCHW regions."""
    findings: tuple[tuple[str, int], ...]
    """(kind, count) in severity order, kinds with none left out."""
    moved: int
    """Bytes its findings move per forward."""
    output: str
    """Name of its output op: the last of its ops that an op outside it reads (else its last op)."""
    output_shape: str
    output_layout: str

    @property
    def share(self) -> float | None:
        """The share of its activation bytes that stay channels_last (None when it has none)."""
        if self.activation_bytes == 0:
            return None
        return 1.0 - self.nchw_bytes / self.activation_bytes

    @property
    def finding_count(self) -> int:
        return sum(n for _, n in self.findings)


def _ancestors(path: str) -> list[str]:
    """``'a.b.c'`` -> ``['', 'a', 'a.b', 'a.b.c']``."""
    parts = path.split(".") if path else []
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def module_rows(
    nodes: Sequence[NodeRecord],
    findings: Sequence[Finding],
    regions: Sequence[Region],
    modules: Sequence[tuple[str, str]],
    model: str,
) -> list[ModuleRow]:
    """One row per module that ran an op, in tree order (children by first execution), root first."""
    types = dict(modules)
    ops = [r for r in nodes if r.op not in SKIP_OPS]
    members: dict[str, list[NodeRecord]] = {"": []}
    for r in ops:
        for p in _ancestors(r.module_path):
            members.setdefault(p, []).append(r)
            if p not in types and p == r.module_path:
                types[p] = r.module_type
    in_regions = {n for reg in regions for n in reg.nodes}
    by_node: dict[str, list[Finding]] = {}
    for f in findings:
        by_node.setdefault(f.node, []).append(f)
    users = {r.name: r.users for r in nodes}
    kinds = list(FindingKind)
    children: dict[str, list[str]] = {}
    for p in members:
        if p:
            children.setdefault(p.rpartition(".")[0], []).append(p)
    rows: list[ModuleRow] = []

    def visit(path: str, depth: int) -> None:
        rs = members[path]
        names = {r.name for r in rs}
        out = next((r for r in reversed(rs) if any(u not in names for u in users[r.name])), rs[-1] if rs else None)
        fs = [f for r in rs for f in by_node.get(r.name, ())]
        total, nchw = activation_bytes((r for r in rs if counts_for_share(r)), in_regions)
        rows.append(
            ModuleRow(
                path=path,
                name=path.rpartition(".")[2] if path else types.get("", model),
                type=types.get(path, ""),
                depth=depth,
                parent=None if not path else path.rpartition(".")[0],
                ops=len(rs),
                activation_bytes=total,
                nchw_bytes=nchw,
                findings=tuple((k.value, n) for k in kinds if (n := sum(1 for f in fs if f.kind is k))),
                moved=sum(f.bytes for f in fs),
                output=out.name if out else "",
                output_shape=", ".join(o.shape_str for o in out.outputs) if out else "",
                output_layout=out.output_layout.value if out else "",
            )
        )
        first = {p: members[p][0].index for p in children.get(path, ())}
        for child in sorted(children.get(path, ()), key=first.__getitem__):
            visit(child, depth + 1)

    visit("", 0)
    return rows


def _lines(*facts: str) -> str:
    return "\n".join(f for f in facts if f)


def _node_tip(r: NodeRecord, kinds: list[str]) -> str:
    ins = ", ".join(i.meta.layout.value for i in r.activation_inputs if i.meta.is_spatial)
    return _lines(
        f"{r.name} = {r.op_label}",
        f"module: {r.module_path} ({r.module_type})" if r.module_path else "",
        f"layout: {r.output_layout.value}" + (f" (inputs: {ins})" if ins else ""),
        "shape: " + ", ".join(o.shape_str for o in r.outputs) if r.outputs else "",
        f"dtype: {r.outputs[0].dtype}, {fmt_bytes(r.output_bytes)}" if r.outputs else "",
        f"source: {short_source(r.source)}" if r.source else "",
        "findings: " + ", ".join(kinds) if kinds else "",
    )


def _module_tip(m: ModuleRow) -> str:
    return _lines(
        f"{m.path or m.name} ({m.type})" if m.type else m.path,
        f"{m.ops} ops",
        f"output: {m.output_shape} ({m.output_layout})" if m.output_shape else "",
        f"channels_last: {fmt_share(m.share)} of {fmt_bytes(m.activation_bytes)}" if m.share is not None else "",
        "findings: " + ", ".join(f"{n} {k}" for k, n in m.findings) if m.findings else "findings: none",
        f"moved: {fmt_bytes(m.moved)} per forward" if m.moved else "",
    )


def _opened(rows: Sequence[ModuleRow]) -> list[str]:
    """The modules the graph opens with: the root, then containers at the top level while the
    graph stays small (an SD-1.5 UNet opens as its down, mid and up blocks)."""
    opened = [""]
    shown = sum(1 for m in rows if m.depth == 1) + (rows[0].ops - sum(m.ops for m in rows if m.depth == 1))
    kids: dict[str | None, int] = {}
    for m in rows:
        kids[m.parent] = kids.get(m.parent, 0) + 1
    for m in rows:
        if m.depth == 1 and m.type in _CONTAINERS and shown - 1 + kids.get(m.path, 0) <= _OPEN_LIMIT:
            opened.append(m.path)
            shown += kids.get(m.path, 0) - 1
    return opened


def drawn(r: NodeRecord) -> bool:
    """Ops the graph draws: the inputs, the output and every op that makes a tensor. Weights
    belong to the op that reads them; ops on Python numbers only (``size``, shape arithmetic)
    stay in the node table."""
    return r.op in ("placeholder", "output") or (r.op != "get_attr" and bool(r.outputs))


def graph_data(nodes: Sequence[NodeRecord], findings: Sequence[Finding], rows: Sequence[ModuleRow]) -> dict[str, Any]:
    """Plain lists for the report's script: modules (parent index, colour share, findings),
    ops (module index, layout, label, tooltip with one fact per line) and edges (heavy where a
    layout changes), and which modules the graph opens with."""
    index = {m.path: i for i, m in enumerate(rows)}
    kinds: dict[str, list[str]] = {}
    for f in findings:
        kinds.setdefault(f.node, []).append(f.kind.value)
    shown = [r for r in nodes if drawn(r)]
    position = {r.name: i for i, r in enumerate(shown)}
    changes = {f.node for f in findings if f.kind in (FindingKind.CONVERSION, FindingKind.MIXED)}
    reverts = {f.node for f in findings if f.kind is FindingKind.REVERT}
    edges = [
        [position[r.name], position[u], int(u in changes or r.name in reverts)]
        for r in shown
        for u in r.users
        if u in position
    ]

    parents = {m.parent for m in rows}
    drawn_in: dict[int, int] = {}
    for r in shown:
        j = index.get(r.module_path, 0)
        drawn_in[j] = drawn_in.get(j, 0) + 1
    return {
        "modules": [
            {
                "path": m.path,
                "name": m.name,
                "type": m.type,
                "parent": index[m.parent] if m.parent is not None else -1,
                "ops": m.ops,
                "share": None if m.share is None else round(m.share, 4),
                "kinds": [k for k, _ in m.findings],
                "findings": sum(n for _, n in m.findings),
                "tip": _module_tip(m),
                # a leaf module of one op is drawn as that op, never as a block or a frame
                "flat": m.path != "" and m.path not in parents and drawn_in.get(index[m.path], 0) <= 1,
            }
            for m in rows
        ],
        "nodes": [
            {
                "name": r.name,
                "op": f"input {r.name}" if r.op == "placeholder" else r.op_label,
                "shape": r.outputs[0].shape_str if r.outputs else "",
                "layout": r.output_layout.value,
                "module": index.get(r.module_path, 0),  # inputs and the output: the root
                "kinds": kinds.get(r.name, []),
                "tip": _node_tip(r, kinds.get(r.name, [])),
            }
            for r in shown
        ],
        "edges": edges,
        "open": [index[p] for p in _opened(rows)],
    }
