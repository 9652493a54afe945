"""Fake against real: the nodes where a real and a fake run of the same graph disagree
(mode='both'). The ops known to disagree are :mod:`nhwc_audit.propagate.corrections`."""

from __future__ import annotations

from collections.abc import Sequence

from ..records import Finding, FindingKind, Layout, NodeRecord

__all__ = ["divergences"]


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
