"""The module tree and the graph's data: every op grouped under the modules it ran in.

:func:`module_rows` gives one row per module the forward ran (like torchinfo's summary): type,
output, layout, the share of its activation bytes that stay channels_last, its findings and the
bytes they move. :func:`graph_data` is what the report's script lays out (with dagre) and draws:
ops, edges between them, and the modules they collapse into. Imports no torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..analyze.analysis import activation_bytes, share_ops
from ..analyze.origin import SKIP_OPS
from ..records import Finding, FindingKind, NodeRecord, Region
from .text import fmt_bytes, fmt_share, short_source

__all__ = ["ModuleRow", "drawn", "finding_kinds", "graph_data", "module_rows"]

_CONTAINERS = frozenset({"Sequential", "ModuleList", "ModuleDict"})
"""Module types that run no op of their own: the graph opens them to show their children."""
_OPEN_LIMIT = 60
"""The graph opens containers only while it shows at most this many blocks and ops."""
_GROUP_MIN = 3
"""A module's own ops in one helper function form a block from this many."""


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
    """Bytes its findings move per forward (per training step in a train audit)."""
    output: str
    """Name of its output op: the last of its ops that an op outside it reads (else its last op)."""
    output_shape: str
    output_layout: str

    @property
    def share(self) -> float | None:
        """The share of its activation bytes that stay channels_last (None when it has none)."""
        return _share(self.activation_bytes, self.nchw_bytes)

    @property
    def finding_count(self) -> int:
        return sum(n for _, n in self.findings)


def _op_bytes(nodes: Sequence[NodeRecord], regions: Sequence[Region]) -> dict[str, tuple[int, int]]:
    """Op name -> (its activation bytes, of those in NCHW regions), for the ops the share is
    taken over: worked out once per op (a module's row sums those of its ops, and every op is
    in the rows of all its ancestors)."""
    in_regions = {n for reg in regions for n in reg.nodes}
    return {r.name: activation_bytes((r,), in_regions) for r in share_ops(nodes)}


def _tally(
    rs: Sequence[NodeRecord], kinds: dict[str, list[str]], own: dict[str, tuple[int, int]]
) -> tuple[int, int, tuple[tuple[str, int], ...]]:
    """What a set of ops adds up to: (activation bytes, of those in NCHW regions, (kind, count)
    of their findings in severity order): a module's row and a function's block alike; ``own``:
    :func:`_op_bytes`."""
    total = nchw = 0
    for r in rs:
        got = own.get(r.name)
        if got is not None:
            total += got[0]
            nchw += got[1]
    found = Counter(k for r in rs for k in kinds.get(r.name, ()))
    return total, nchw, tuple((k.value, found[k.value]) for k in FindingKind if found[k.value])


def _share(total: int, nchw: int) -> float | None:
    return None if total == 0 else 1.0 - nchw / total


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
    own = _op_bytes(ops, regions)
    kinds = finding_kinds(findings)
    moved: Counter[str] = Counter()
    for f in findings:
        moved[f.node] += f.bytes
    users = {r.name: r.users for r in nodes}
    children: dict[str, list[str]] = {}
    for p in members:
        if p:
            children.setdefault(p.rpartition(".")[0], []).append(p)
    rows: list[ModuleRow] = []

    def visit(path: str, depth: int) -> None:
        rs = members[path]
        names = {r.name for r in rs}
        out = next((r for r in reversed(rs) if any(u not in names for u in users[r.name])), rs[-1] if rs else None)
        total, nchw, found = _tally(rs, kinds, own)
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
                findings=found,
                moved=sum(moved[r.name] for r in rs),
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


def finding_kinds(findings: Sequence[Finding]) -> dict[str, list[str]]:
    """Each op's finding kinds."""
    kinds: dict[str, list[str]] = {}
    for f in findings:
        kinds.setdefault(f.node, []).append(f.kind.value)
    return kinds


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


def _module_tip(m: ModuleRow, per: str) -> str:
    return _lines(
        f"{m.path or m.name} ({m.type})" if m.type else m.path,
        f"{m.ops} ops",
        f"output: {m.output_shape} ({m.output_layout})" if m.output_shape else "",
        f"channels_last: {fmt_share(m.share)} of {fmt_bytes(m.activation_bytes)}" if m.share is not None else "",
        "findings: " + ", ".join(f"{n} {k}" for k, n in m.findings) if m.findings else "findings: none",
        f"moved: {fmt_bytes(m.moved)} {per}" if m.moved else "",
    )


def drawn(r: NodeRecord) -> bool:
    """Ops the graph draws: the inputs, the output, every op that makes a tensor and every op
    that raised (a break). Weights belong to the op that reads them; ops on Python numbers
    only (``size``, shape arithmetic) stay in the node table."""
    return r.op in ("placeholder", "output") or (r.op != "get_attr" and (bool(r.outputs) or r.error is not None))


def _function_groups(shown: Sequence[NodeRecord], module_of: dict[str, int]) -> dict[str, tuple[int, str]]:
    """Ops a module runs itself in a helper function (not ``forward``), that function's name, for
    functions with at least ``_GROUP_MIN`` of them: a detector's ``postprocess_detections`` and
    ``decode`` draw as two blocks, not two hundred ops."""
    keys = {
        r.name: (module_of[r.name], r.source.function)
        for r in shown
        if r.op not in SKIP_OPS
        and r.source is not None
        and r.source.function != "forward"
        # a comprehension's or lambda's frame is part of the function around it, not a block
        and not r.source.function.startswith("<")
    }
    sizes = Counter(keys.values())
    return {name: key for name, key in keys.items() if sizes[key] >= _GROUP_MIN}


def graph_data(
    nodes: Sequence[NodeRecord],
    findings: Sequence[Finding],
    regions: Sequence[Region],
    rows: Sequence[ModuleRow],
    per: str = "per forward",
) -> dict[str, Any]:
    """Plain lists for the report's script: modules and function groups (parent index, colour
    share, findings), ops (module or group index, layout, label, tooltip with one fact per line),
    edges (heavy where a layout changes), and which modules the graph opens with. ``per``: what the
    bytes count (the audit's :attr:`~nhwc_audit.records.Summary.per`)."""
    index = {m.path: i for i, m in enumerate(rows)}
    kinds = finding_kinds(findings)
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
    module_of = {r.name: index.get(r.module_path, 0) for r in shown}  # inputs and the output: the root
    grouped = _function_groups(shown, module_of)
    members: dict[tuple[int, str], list[NodeRecord]] = {}
    for r in shown:  # in execution order: each group's ops, and the groups by their first op
        if r.name in grouped:
            members.setdefault(grouped[r.name], []).append(r)
    group_index = {k: len(rows) + i for i, k in enumerate(members)}
    owner = {r.name: group_index[grouped[r.name]] if r.name in grouped else module_of[r.name] for r in shown}
    own = _op_bytes(shown, regions)
    modules: list[dict[str, Any]] = [
        {
            "path": m.path,
            "name": m.name,
            "type": m.type,
            "parent": index[m.parent] if m.parent is not None else -1,
            "ops": m.ops,
            "share": None if m.share is None else round(m.share, 4),
            "kinds": [k for k, _ in m.findings],
            "findings": m.finding_count,
            "tip": _module_tip(m, per),
        }
        for m in rows
    ]
    for (j, function), ops in members.items():  # appended in group_index's order
        total, nchw, found = _tally(ops, kinds, own)
        where = rows[j].path or rows[j].name
        share = _share(total, nchw)
        modules.append(
            {
                "path": f"{rows[j].path}.{function}()" if rows[j].path else f"{function}()",
                "name": f"{function}()",
                "type": "",
                "parent": j,
                "ops": len(ops),
                "share": None if share is None else round(share, 4),
                "kinds": [k for k, _ in found],
                "findings": sum(n for _, n in found),
                "tip": _lines(
                    f"{function}() in {where}",
                    f"{len(ops)} ops it runs itself",
                    f"channels_last: {fmt_share(share)} of {fmt_bytes(total)}" if share is not None else "",
                    "findings: " + ", ".join(f"{n} {k}" for k, n in found) if found else "findings: none",
                ),
            }
        )
    items = Counter(owner.values())  # what opening each module shows: its ops, groups, submodules
    inner = Counter(m["parent"] for m in modules if m["parent"] >= 0)
    items.update(inner)
    fed = {b for a, b, _ in edges if owner[shown[a].name] == owner[shown[b].name]}
    starts = Counter(owner[r.name] for i, r in enumerate(shown) if i not in fed)
    for i, m in enumerate(modules):
        # a leaf module is drawn as its ops, not as a block, when it has one, or when its ops
        # start more than one chain: a module called more than once (BasicBlock's relu), whose
        # block would join its calls into a cycle
        m["flat"] = 0 < i < len(rows) and not inner[i] and (items[i] <= 1 or starts[i] > 1)
    opened = [0]
    count = items[0]
    for i, m in enumerate(modules[: len(rows)]):  # then containers at the top, while few dozen
        if m["parent"] == 0 and m["type"] in _CONTAINERS and count - 1 + items[i] <= _OPEN_LIMIT:
            opened.append(i)
            count += items[i] - 1
    return {
        "modules": modules,
        "nodes": [
            {
                "name": r.name,
                "op": f"input {r.name}" if r.op == "placeholder" else r.op_label,
                "shape": r.outputs[0].shape_str if r.outputs else "",
                "layout": r.output_layout.value,
                "module": owner[r.name],
                "kinds": kinds.get(r.name, []),
                "tip": _node_tip(r, kinds.get(r.name, [])),
            }
            for r in shown
        ],
        "edges": edges,
        "open": opened,
        "tree": len(rows),
    }
