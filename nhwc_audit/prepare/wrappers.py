"""Modules that wrap a model to run it another way: ``torch.compile``'s ``OptimizedModule``,
``nn.DataParallel`` and ``DistributedDataParallel``. Their forward computes what the wrapped
module's does; the audit runs the wrapped one (:func:`unwrapped`, and in the audit's private
copies :func:`wrapped_module`), whose eager kernels are what the report is about. Audited as a
wrapper, torch.fx cannot trace it (a compiled module: 'missing the required forward function')
and dynamo compiles the audit's own code on an eager run (46 frames, 2.4 s for three layers)."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrapped", "wrapped_module"]


def wrapped_module(m: nn.Module) -> nn.Module | None:
    """The module ``m`` wraps, or None when it wraps none."""
    if type(m).__name__ == "OptimizedModule":  # torch._dynamo's class, named not imported (a slow import)
        inner = getattr(m, "_orig_mod", None)
    else:
        inner = m.module if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else None
    return inner if isinstance(inner, nn.Module) else None


def unwrapped(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The module ``model``'s wrappers wrap (``model`` when none), and a note naming them."""
    names: list[str] = []
    inner = wrapped_module(model)
    while inner is not None:
        names.append(type(model).__name__)
        model, inner = inner, wrapped_module(inner)
    if not names:
        return model, None
    compiled = " (torch.compile's own kernels may pick other layouts)" if "OptimizedModule" in names else ""
    return model, (
        f"audited {type(model).__name__}, which {' in '.join(reversed(names))} wraps: the audit runs the "
        f"wrapped module's eager kernels{compiled}"
    )
