"""What the modules at some paths of a model are called with in one run: the inputs a part of a model
gets there (:mod:`.parts` repairs it on them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .results import Sample

__all__ = ["calls_in"]


def calls_in(run: nn.Module, paths: Sequence[str], sample: Sample) -> dict[str, list[Sample]]:
    """What each module at ``paths`` is called with in one run of ``run`` (a private copy of the model)
    on ``sample`` (each call's tensors cloned as they came: a later op may write into them). A model
    that breaks (``x.view`` in its top forward on channels_last) stops at the break: the parts called
    before it are known, the others are not called."""
    calls: dict[str, list[Sample]] = {p: [] for p in paths}

    def keep(v: Any) -> Any:
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    handles = []
    for p in paths:

        def pre(m: nn.Module, a: tuple[Any, ...], k: dict[str, Any], p: str = p) -> None:
            calls[p].append(torch.utils._pytree.tree_map(keep, (a, dict(k))))

        handles.append(run.get_submodule(p).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            run(*sample[0], **sample[1])
    except Exception:
        pass  # (the break is the audit's finding; the check of the repaired model meets it again)
    finally:
        for h in handles:
            h.remove()
    return calls
