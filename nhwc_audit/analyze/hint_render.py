"""A hint's text for one finding: the table's entry (:mod:`.hints`) with its fields filled in."""

from __future__ import annotations

from ..records import FindingKind, NodeRecord
from .hints import KIND_DEFAULTS, HintTable

__all__ = ["hint_keys", "render_hint"]


class _Fields(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "?"


_RANKED = {
    4: {
        "channels_last": "torch.channels_last",
        "nhwc": "(N, H, W, C)",
        "to_nhwc": "(0, 2, 3, 1)",
        "to_nchw": "(0, 3, 1, 2)",
    },
    5: {
        "channels_last": "torch.channels_last_3d",
        "nhwc": "(N, D, H, W, C)",
        "to_nhwc": "(0, 2, 3, 4, 1)",
        "to_nchw": "(0, 4, 1, 2, 3)",
    },
}
"""The fields a hint names a memory format or a dim order by, for a 2D map and a volume."""


def render_hint(
    table: HintTable, kind: FindingKind, key: str | tuple[str, ...], *, rank: int = 4, **fields: str | None
) -> str:
    """The hint for ``kind`` at op ``key`` (the first of several keys the table has, else the
    kind's default), with the fields (``op``, ``origin``, ``device``, ``detail``) filled in, and
    the memory format and dim orders of a tensor of ``rank`` (``channels_last``, ``nhwc``,
    ``to_nhwc``, ``to_nchw``: ``torch.channels_last_3d`` for a volume)."""
    keys = (key,) if isinstance(key, str) else key
    device = (fields.get("device") or "").split(":")[0]
    candidates = [f"{k.lower()}@{device}" for k in keys] + [k.lower() for k in keys]
    text = next((table[(kind, k)] for k in candidates if (kind, k) in table), KIND_DEFAULTS[kind])
    values = _Fields({**_RANKED[5 if rank == 5 else 4], **{k: v for k, v in fields.items() if v is not None}})
    return text.format_map(values)


def hint_keys(r: NodeRecord) -> tuple[str, ...]:
    """The keys of ``r``'s hint: the op's own name, then (an ATen op in a torch.nn leaf module, as
    export and hooks record it) the module type: InstanceNorm2d's clone gets the InstanceNorm hint;
    a conv's is about the kernel only."""
    if r.in_leaf_module and not r.module_type.lower().startswith(("conv", "convtranspose")):
        return (r.op_name, r.module_type)
    return (r.op_name,)
