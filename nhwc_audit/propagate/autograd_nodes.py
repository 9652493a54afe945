"""Reading an autograd node from its hooks: its own dict, the tensors it saved, and where an
``AsStridedBackward`` node's view runs over its base (:mod:`.grad_hooks`)."""

from __future__ import annotations

from typing import Any

import torch

from ..tensors import iter_tensors, view_reorders

__all__ = ["metadata", "permuted_view", "saved_tensors"]


def metadata(node: Any) -> dict[str, Any]:
    """An autograd node's own dict (``Node.metadata``, a property the stubs call a method)."""
    meta: dict[str, Any] = node.metadata
    return meta


def saved_tensors(node: Any, names: dict[type, tuple[str, ...]]) -> list[torch.Tensor]:
    """The 4D/5D tensors ``node`` saved for its backward (readable before it runs); ``names``:
    the ``_saved_*`` attributes of each autograd node class that hold tensors, found once. Not
    those packed by saved-tensor hooks (a non-reentrant checkpoint recomputes them when unpacked,
    once: reading one here would make the backward itself fail)."""
    kind = type(node)
    if kind not in names:
        names[kind] = tuple(a for a in dir(kind) if a.startswith("_saved_") and hasattr(kind, "_raw" + a))
    out: list[torch.Tensor] = []
    for attr in names[kind]:
        try:
            raw = getattr(node, "_raw" + attr)
            if any(r.unpack_hook is not None for r in (raw if isinstance(raw, (list, tuple)) else (raw,))):
                continue
            value = getattr(node, attr)
        except Exception:  # released, or not a tensor after all
            continue
        out += [t for t in iter_tensors(value) if t.dim() >= 4]
    return out


def permuted_view(node: Any, base_grad: torch.Tensor) -> bool:
    """An ``AsStridedBackward`` node's view reorders its base's dims (``base_grad`` is laid as the
    base): only then does the NCHW run's backward move data there too, where no other node reorders."""
    size, stride = getattr(node, "_saved_size", None), getattr(node, "_saved_stride", None)
    return size is None or stride is None or view_reorders(size, stride, base_grad)
