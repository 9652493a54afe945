"""How the audit runs the model: :class:`Runner` (seed, autocast, the guard on shared weights,
fake mode), module state restored around captures, and the batch's first sample for checks."""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..prepare.caches import emptied
from ..prepare.copy import model_tensors
from ..prepare.fake import meta_failures_unlogged
from ..tensors import clone_value, iter_tensors, seeded, to_nchw
from .corrections import Corrections
from .dispatch import CopyRecorder

__all__ = [
    "Runner",
    "as_built_pairs",
    "StateKept",
    "autograd",
    "batch_of",
    "fake_limitation",
    "first_sample",
    "nchw_error",
    "quiet",
]


@dataclass(frozen=True)
class Runner:
    """How every run of the model executes: seeded (random ops repeat), under autocast when
    asked, refusing writes to the user's weights the audit reads in place (``shared``), and
    inside ``fake_mode`` for fake audits."""

    device_type: str = "cpu"
    autocast: torch.dtype | None = None
    shared: frozenset[int] = frozenset()
    fake_mode: Any = None
    seed: int = 0
    correct: bool = True
    """Fake runs follow eager where meta kernels are known to be wrong
    (:mod:`.corrections`); mode 'both' keeps the raw meta layouts it compares."""
    caches: tuple[Any, ...] = ()
    """The lru caches of the model's code, emptied around each fake run (and by the pipeline
    around each capture: :mod:`~nhwc_audit.prepare.caches`)."""
    grad: bool = False
    """Runs go with autograd, as training runs the model (a train audit): the propagation and
    every run compared with it, so that a module with a path of its own without autograd
    (MultiheadAttention's fused fast path) takes the same one everywhere."""
    as_built: tuple[tuple[int, torch.Tensor], ...] = ()
    """(id of a sample tensor, the tensor the model as built gets there) where that is not an NCHW
    copy of it: a part of a model in the NCHW run's baseline (:mod:`~nhwc_audit.fix.parts`) gets what
    the NCHW model hands it (an encoder's last map, computed channels_last by its kernel)."""

    def built(self, v: Any) -> Any:
        """Sample value ``v`` as the model as built gets it: :attr:`as_built`'s tensor, else an NCHW
        copy of a 4D/5D tensor with PyTorch's canonical strides (``contiguous()`` keeps a C == 1
        tensor's channels_last strides, and kernels follow them), else ``v``."""
        for key, t in self.as_built:
            if key == id(v):
                return t.clone(memory_format=torch.preserve_format)  # (each run may write its input)
        if isinstance(v, torch.Tensor) and v.dim() in (4, 5):
            return v.clone(memory_format=torch.contiguous_format)
        return v

    def grad_mode(self) -> Any:
        """The autograd mode of every run (:func:`autograd`)."""
        return autograd(self.grad)

    @property
    def fake(self) -> bool:
        return self.fake_mode is not None

    @property
    def absent_cuda(self) -> bool:
        """A fake run predicting CUDA on a machine without it."""
        return self.fake and self.device_type == "cuda" and not torch.cuda.is_available()

    def corrections(self) -> Corrections | None:
        """Fresh corrections for one fake run; None for a real run (or mode 'both''s raw half)."""
        return Corrections(self.device_type) if self.fake and self.correct else None

    @contextlib.contextmanager
    def context(self, *, guard: bool = True, corrections: Corrections | None = None) -> Iterator[None]:
        """Seeded RNG, fake mode (with the ``corrections`` of a fake run's strides), autocast and
        (``guard``) the shared-weight guard. The propagation guards on its own (its recorder
        refuses the writes)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(seeded(self.seed, cuda=self.device_type == "cuda" and not self.fake))
            if self.fake_mode is not None:
                stack.enter_context(emptied(self.caches))
                stack.enter_context(meta_failures_unlogged())
                stack.enter_context(self.fake_mode)
                if corrections is not None:
                    stack.enter_context(corrections.eager_strides())
            stack.enter_context(self.amp())
            if guard and self.shared:
                stack.enter_context(CopyRecorder(self.shared))
            yield

    def amp(self) -> contextlib.AbstractContextManager[None]:
        """The audit's autocast alone: a trace under it sees the dtypes its run computes in (code
        that makes a tensor in another's dtype, ``dtype=h.dtype``, bakes the one it sees)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return autocast(self.device_type, self.autocast, absent=self.absent_cuda)

    def forward(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One forward of ``model`` (or a captured graph) on clones of the sample."""
        with self.context(), self.grad_mode():
            return model(*tree_map(clone_value, args), **tree_map(clone_value, kwargs))


@contextlib.contextmanager
def autocast(device_type: str, dtype: torch.dtype, *, absent: bool) -> Iterator[None]:
    """``torch.autocast`` for ``device_type``; for a fake run on a device this machine lacks
    (``absent``: CUDA predicted on a CPU machine, :attr:`Runner.absent_cuda`), its flags set
    directly: ``torch.autocast`` disables itself there with a warning, and a float16 prediction
    ran in float32. Fake tensors of that device dispatch
    through its autocast keys as real ones would (the device's cast policy: GroupNorm in float32).
    A ``torch.autocast('cuda')`` block of the model's own runs as on CUDA too (its availability check
    answers so for the run; else it switched autocast off inside and the ops there met float16)."""
    if not absent:
        with torch.autocast(device_type=device_type, dtype=dtype):
            yield
        return
    from torch.cuda.amp import common

    before = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    check = common.amp_definitely_not_available
    common.amp_definitely_not_available = lambda: False
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, before[0])
        torch.set_autocast_dtype(device_type, before[1])
        common.amp_definitely_not_available = check


def autograd(grad: bool) -> Any:
    """``enable_grad`` for a run as training runs the model (a train audit's), else ``no_grad``."""
    return torch.enable_grad() if grad else torch.no_grad()


def fake_limitation(e: BaseException) -> bool:
    """``e`` is fake tensors' own limit, not the model's error: an op that needs tensor values
    (``.item()`` on a computed tensor, data-dependent shapes), one fake tensors do not support,
    or a real tensor meeting fake ones."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    limits = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)
    if isinstance(e, (*limits, GuardOnDataDependentSymNode)):
        return True
    return "FakeTensor" in str(e)


def batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The sample's batch size when it is larger than 1 and clear (the leading dim of its
    4D/5D inputs, all equal), else None."""
    images = [t for t in iter_tensors((args, kwargs)) if t.dim() in (4, 5)]
    if not images or len({t.shape[0] for t in images}) != 1 or images[0].shape[0] <= 1:
        return None
    return int(images[0].shape[0])


def first_sample(
    args: tuple[Any, ...], kwargs: dict[str, Any], batch: int | None, items: int = 1
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The sample cut to its first ``items`` when it has a larger ``batch`` (:func:`batch_of`;
    cut wherever a tensor has that leading dim), else None."""
    if batch is None or batch <= items:
        return None

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch:
            return v[:items].clone()  # clone keeps the channels_last strides of the slice's layout
        return v

    return tuple(tree_map(cut, a) for a in args), {k: tree_map(cut, v) for k, v in kwargs.items()}


class StateKept:
    """The model's parameters and buffers as they were when taken (``model``; none when None), and
    those that runs of it have written in place since (:attr:`written`): a forward that updates
    its own state (a buffer it adds to, a power iteration's vectors). ``with kept():`` runs a
    block from their values now and puts them back after, so that a graph and eager, run one
    after the other, start alike; :meth:`undo` puts the buffers back as taken."""

    def __init__(self, model: nn.Module | None) -> None:
        # parameters, then buffers; an inference tensor keeps no version counter (torch.inference_mode)
        tensors = model_tensors(model) if model is not None else ()
        live = [(t, is_param) for _, t, is_param in tensors if not t.is_inference()]
        self._versions = [(t, t._version) for t, _ in live]
        self._taken = {id(t): t.detach().clone() for t, is_param in live if not is_param}

    @property
    def written(self) -> list[torch.Tensor]:
        return [t for t, v in self._versions if t._version != v]

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        saved = [(t, t.detach().clone()) for t in self.written]
        try:
            yield
        finally:
            with torch.no_grad():
                for t, value in saved:
                    t.copy_(value)

    def undo(self) -> None:
        """The buffers written since taken as they were, with no autograd history: the run of a
        capture the chain drops leaves nothing for the next one (a running average taken with
        autograd on would carry that run's graph into the next capture's backward)."""
        with torch.no_grad():
            for t in self.written:
                if id(t) in self._taken and not isinstance(t, nn.Parameter):
                    if t.grad_fn is not None:
                        t.detach_()
                    t.copy_(self._taken[id(t)])


def quiet() -> contextlib.AbstractContextManager[Any]:
    """stderr kept for a block: a GraphModule prints the traceback of what it raises there before
    raising it, which the caller handles."""
    return contextlib.redirect_stderr(io.StringIO())


def nchw_error(runner: Runner, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception | None:
    """What one eager forward of ``model`` as built (NCHW: its weights and the sample contiguous, its
    buffers copied; the model untouched) raises, or None where it runs."""
    params = model.named_parameters(remove_duplicate=False)
    buffers = ((name, clone_value(b)) for name, b in model.named_buffers(remove_duplicate=False))  # (forward may write)
    try:
        with runner.context(), runner.grad_mode(), quiet():
            state = {name: to_nchw(t) for name, t in itertools.chain(params, buffers)}
            args, kwargs = tree_map(clone_value, tree_map(runner.built, (args, kwargs)))
            torch.func.functional_call(model, state, args, kwargs)
    except Exception as error:
        return error
    return None


def as_built_pairs(sample: Any, given: Any) -> tuple[tuple[int, torch.Tensor], ...]:
    """Each tensor of the audit's ``sample`` paired with the tensor in the same place of ``given``
    (:attr:`~nhwc_audit.pipeline.AuditOptions.as_built`, for :attr:`Runner.as_built`; none when not given or not of the sample's structure)."""
    if given is None:
        return ()
    mine, spec = tree_flatten(sample)
    theirs, their_spec = tree_flatten(given)
    if spec != their_spec:
        return ()
    return tuple(
        (id(a), b.to(device=a.device, dtype=a.dtype))
        for a, b in zip(mine, theirs, strict=True)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
    )
