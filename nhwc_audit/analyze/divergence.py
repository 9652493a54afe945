"""Fake against real: the ops whose meta kernels are known to disagree with eager kernels,
and the nodes where a real and a fake run of the same graph disagree (mode='both')."""

from __future__ import annotations

from collections.abc import Sequence

from ..propagate.corrections import KNOWN_DIVERGENCES
from ..records import Finding, FindingKind, Layout, NodeRecord

__all__ = ["KNOWN_DIVERGENCES", "divergence_warnings", "divergences"]


def divergence_warnings(op_names: set[str], device: str) -> list[str]:
    """Known fake-vs-real disagreements for the ops this audit met on this device type."""
    dev = device.split(":")[0]
    return sorted({d.text for d in KNOWN_DIVERGENCES if d.device == dev and d.ops & op_names})


def divergences(real: Sequence[NodeRecord], fake: Sequence[NodeRecord], device: str) -> list[Finding]:
    """Nodes whose output layout differs between the real run and the fake run of the same
    graph (matched by node name). Each predicts a place where compiled code, which plans
    with meta kernels, disagrees with eager (a stride assert or an extra conversion)."""
    fake_by = {r.name: r for r in fake}
    out: list[Finding] = []
    for r in real:
        f = fake_by.get(r.name)
        if f is None or r.op in ("placeholder", "get_attr", "output"):
            continue
        a, b = r.output_layout, f.output_layout
        if a == b or Layout.AMBIGUOUS in (a, b):
            continue
        spatial = r.spatial_outputs
        out.append(
            Finding(
                node=r.name,
                index=r.index,
                kind=FindingKind.DIVERGENCE,
                op=r.op_name,
                target=r.target,
                module_path=r.module_path,
                module_type=r.module_type,
                source=r.source,
                layout_in=a,
                layout_out=b,
                shape=spatial[0].shape if spatial else (),
                detail=r.detail,
                bytes=0,
                est_seconds=0.0,
                hint=(
                    f"real {device} kernels give {a.value}, fake/meta kernels give {b.value}: torch.compile "
                    "plans with meta kernels, so expect a stride assert or an extra conversion here; fake-mode "
                    "audits of this op are unreliable"
                ),
            )
        )
    return out
