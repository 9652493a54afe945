"""A loss's gradients with respect to parameters a checking copy shares with the user's model."""

from __future__ import annotations

import torch

from ..propagate.onednn import guarded

__all__ = ["gradients"]


def gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """``loss``'s gradients with respect to ``params``: ``autograd.grad``, or where a reentrant
    checkpoint refuses it, ``backward()`` into ``.grad`` with each parameter's own put back (they
    are the user's: a checking copy shares them). The repair refused every rewrite of such a model,
    blaming the rewrite. A oneDNN kernel that would crash the process runs without oneDNN
    (:class:`~nhwc_audit.propagate.onednn.Guard`)."""
    with guarded(params, loss):
        return _gradients(loss, params)


def _gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    try:
        return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)  # (kept for a retry)
    except RuntimeError as e:
        if "use_reentrant=True" not in str(e):
            raise
    kept = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        loss.backward()  # type: ignore[no-untyped-call]
        return tuple(p.grad for p in params)
    finally:
        for p, g in zip(params, kept, strict=True):
            p.grad = g
