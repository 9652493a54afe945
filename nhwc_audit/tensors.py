"""Small tensor helpers shared by the stages that run the model (one definition each)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["clone_value", "is_plain_dense", "iter_tensors", "to_nchw"]


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors among the pytree leaves of ``value``."""
    for leaf in tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def is_plain_dense(t: torch.Tensor) -> bool:
    """``t`` is a plain dense tensor (or Parameter): no subclass, sparse or quantized layout,
    so its shape, strides and dtype describe it whole."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided and not t.is_quantized


def clone_value(v: Any) -> Any:
    """A tensor's clone with its strides kept (``preserve_format``); other values as they are."""
    return v.clone() if isinstance(v, torch.Tensor) else v


def to_nchw(v: Any) -> Any:
    """A 4D/5D tensor made contiguous (NCHW/NCDHW); other values as they are."""
    if isinstance(v, torch.Tensor) and v.dim() in (4, 5):
        return v.contiguous()
    return v
