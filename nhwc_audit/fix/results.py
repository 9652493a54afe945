"""How far two of a model's results on one sample (:func:`~.runs.outputs`: its outputs, and its
parameters' gradients of a fixed random linear loss) are apart (:class:`Deviation`): what the
repair's checks (:mod:`.equivalence`, :mod:`.islands`) compare."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .runs import Results, Sample, fresh_copy, outputs

__all__ = [
    "CONVERSION",
    "ELEMENTS",
    "NOISE",
    "ROUNDING",
    "Deviation",
    "Results",
    "Sample",
    "deviation_of",
    "fresh_copy",
    "gap_norms",
    "gradient_noise",
    "outputs",
    "within",
    "worst_element",
]


@dataclass(frozen=True, slots=True)
class Deviation:
    """How far a channels_last model's results, in the model's own dtype, are from the
    original model's: the largest relative deviation of an output (the norm of the difference
    over the norm of the original's), and the relative deviation of all parameter gradients
    together (the update a training step would make; one parameter's own gradient can be zero
    up to rounding, a conv bias before a norm layer). Values equal in both (an infinity, a NaN
    in the same place) do not count; any other non-finite difference is ``inf``."""

    outputs: float
    gradients: float | None
    """None without gradients (not asked for, or no parameter gets one)."""
    dtype: str = "float32"
    """The dtype both ran in: the model's own."""

    @property
    def worst(self) -> float:
        """The larger of the two (inf for a non-finite difference)."""
        return max(self.outputs, self.gradients or 0.0)

    @property
    def off(self) -> bool:
        """Beyond :data:`CONVERSION`: more than rounding a layout change costs."""
        return self.worst > CONVERSION


CONVERSION = 1e-2
"""How near the naive conversion must be to the original (norms and elements, as :func:`within`
measures) to stand in for it (:func:`~.islands.against_naive`), and beyond which, in norm
(:attr:`Deviation.off`), it is off: converting costs rounding (~1e-6), and a CPU kernel's error
at batch size 1 (the channels_last GroupNorm a repair puts in for an InstanceNorm, on maps with a
large mean: 1.3e-3 on the bundled UNet's gradients, where the naive conversion rounds by 3e-6);
a conversion that changes the math (an ``as_strided`` reading the strides) moves them by the size
of the values, and so does a kernel that computes otherwise in one layout, or a model whose
float32 results are far from exact in both (the repair then asks float64 which: :class:`~.deviation.Exactness`)."""


def gap_norms(results: Results, ref: Results) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    """Norms of ``results`` against ``ref``: (difference, size of ``ref``) of each floating output
    of one shape, and of all parameter gradients together (as :func:`deviation_of` pairs them)."""
    outs, grads = _gaps(results, ref, ratio=False)
    return [(g.diff, g.size) for g in outs], _together(grads)


def _together(grads: dict[str, _Gap]) -> tuple[float, float]:
    """(difference, size) of all gradients together: their norms summed in ``grads``' order."""
    return math.sqrt(sum(g.diff * g.diff for g in grads.values())), math.sqrt(
        sum(g.size * g.size for g in grads.values())
    )


def _difference(ref: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``ref`` in float64 with its non-finite values 0, ``other - ref``), where equal non-finite
    values (the same infinity, NaN against NaN) differ by nothing."""
    a, b = ref.detach().double(), other.detach().double()
    diff = b - a
    if bool(diff.isfinite().all()):  # both finite everywhere (a non-finite value in either is not)
        return a, diff
    same = (a == b) | (a.isnan() & b.isnan())
    zero = torch.zeros_like(a)
    return torch.where(a.isfinite(), a, zero), torch.where(same, zero, diff)


@dataclass(frozen=True, slots=True)
class _Gap:
    """One tensor against its reference, over the finite values of the reference
    (:func:`_difference`)."""

    diff: float
    """The norm of ``other - ref``."""
    size: float
    """The norm of ``ref``."""
    largest: float
    """The largest ``|other - ref|`` of one element (NaN where a difference is not a number)."""
    scale: float
    """The largest ``|ref|``."""
    ratio: float
    """The largest ``|other - ref|`` of one element over ``|ref|`` there plus the median
    ``|ref|`` (the mean where the median is 0): a few huge elements, a mask's -1e9, do not set the
    scale the others are judged at; ``inf`` for a non-finite difference; 0 when not asked for."""


def _gap(ref: torch.Tensor, other: torch.Tensor, ratio: bool) -> _Gap:
    if ref.numel() == 0:
        return _Gap(0.0, 0.0, 0.0, 0.0, 0.0)
    if not ratio and ref.dtype == other.dtype and ref.dtype in _OWN_DTYPE:
        fast = _finite_gap(ref.detach(), other.detach())
        if fast is not None:
            return fast
    a, diff = _difference(ref, other)
    mag, gap = a.abs(), diff.abs()
    r = 0.0
    if ratio:
        typical = float(mag.median()) or float(mag.mean())
        r = float((gap / (mag + max(typical, 1e-30))).max()) if bool(gap.isfinite().all()) else math.inf
    return _Gap(float(diff.norm()), float(a.norm()), float(gap.max()), float(mag.max()), r)


_OWN_DTYPE = (torch.float32, torch.float64)
"""Dtypes whose differences :func:`_finite_gap` takes in their own precision."""


def _finite_gap(ref: torch.Tensor, other: torch.Tensor) -> _Gap | None:
    """:func:`_gap` without its ratio, five passes over the values in their own dtype (norms
    summed in float64) instead of a dozen over float64 copies: what a gradient of a large weight
    costs (resnet18's 11M: 0.3 s a comparison, over a forward and backward). None when a
    difference is not finite (a non-finite value in either makes one): :func:`_difference`
    decides what counts then."""
    diff = other - ref
    dn = float(torch.linalg.vector_norm(diff, dtype=torch.float64))
    if not math.isfinite(dn):
        return None
    lo, hi = torch.aminmax(diff)
    rlo, rhi = torch.aminmax(ref)
    size = float(torch.linalg.vector_norm(ref, dtype=torch.float64))
    return _Gap(dn, size, max(-float(lo), float(hi)), max(-float(rlo), float(rhi)), 0.0)


_Gaps = tuple[list[_Gap], dict[str, _Gap]]


def _gaps(results: Results, ref: Results, ratio: bool) -> _Gaps:
    """The floating outputs and the gradients of ``results`` against ``ref``'s, pairs of one shape
    only; ``ratio``: each output's :attr:`_Gap.ratio` too."""
    (outs, grads), (ref_outs, ref_grads) = results, ref
    return (
        [
            _gap(b, a, ratio)
            for a, b in zip(outs, ref_outs, strict=False)
            if a.is_floating_point() and a.shape == b.shape
        ],
        # in the reference's order: the norms of all gradients are summed in one order whatever the run
        {n: _gap(r, grads[n], False) for n, r in ref_grads.items() if n in grads and grads[n].shape == r.shape},
    )


def _worst(gaps: _Gaps) -> float:
    outs, grads = gaps
    scale = max((g.scale for g in grads.values()), default=0.0)
    # inf for a NaN
    return max([0.0, *(g.ratio for g in outs), *(_relative(g.largest, scale) for g in grads.values())])


def worst_element(results: Results, ref: Results) -> float:
    """The largest difference of one element between ``results`` and ``ref``: for an output,
    over that element's own size plus its output's typical one (:attr:`_Gap.ratio`); for a
    parameter's gradient, over the largest gradient element anywhere in ``ref`` (a gradient that
    is zero but for rounding, a conv bias before a norm layer, has no scale of its own). Pairs of
    one shape only, as :func:`deviation_of` pairs them. A norm-wise deviation dilutes a change of
    a few elements; this does not."""
    return _worst(_gaps(results, ref, ratio=True))


def gradient_noise(a: Results, b: Results) -> dict[str, float]:
    """Per parameter, the norm of the difference of two runs' gradients (what rounding moves
    each one by: the naive conversion against the original)."""
    return {n: g.diff for n, g in _gaps(a, b, ratio=False)[1].items()}


ROUNDING = 1e-5
"""What a float32 model's results may move by (relative norms: the largest of an output, all
parameter gradients together) when only the rounding changes. The naive conversion of the
bundled UNet moves them 2e-6 and 4e-6 with two CPU threads; a rewrite beyond this is checked in
float64 (InstanceNorm -> GroupNorm there: 1.3e-3, GroupNorm's channels_last backward)."""

ELEMENTS = 1e-4
"""What one element of a float32 result may move by when only the rounding changes, as
:func:`worst_element` measures it. The naive conversion of 44 zoo models moves them up to
6.8e-6 on two samples each (resnet50, densenet121 and smp's Unet, whose gradients are already
beyond :data:`ROUNDING` in norm, aside); the bundled UNet's repaired graph, its rewritten nodes
in float64, 6e-7 (outputs) and 1.5e-6 (gradients) from the naive one. A rewrite that changes a
few elements (one output element by 0.005) stays within :data:`ROUNDING` in norm, and is caught
here."""


NOISE = 10.0
"""A parameter's gradient may move by this many times what the naive conversion moves it by
(:func:`gradient_noise`), plus :data:`ELEMENTS` of its norm: a small gradient changed by half
stays within the other measures, diluted by larger ones."""


def within(got: Results, ref: Results, norm: float, element: float, noise: dict[str, float] | None = None) -> bool:
    """``got`` has ``ref``'s outputs (count, shapes, dtypes; the same values where not floating)
    and gradients (names, shapes); its floating values are within ``norm`` of them in norm
    (:func:`deviation_of`) and within ``element`` element by element (:func:`worst_element`);
    with ``noise``, each parameter's gradient within :data:`NOISE` times its noise plus
    ``element`` of its norm."""
    (outs, grads), (ref_outs, ref_grads) = got, ref
    if len(outs) != len(ref_outs) or grads.keys() != ref_grads.keys():
        return False
    for a, b in zip(outs, ref_outs, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype or (not a.is_floating_point() and not torch.equal(a, b)):
            return False
    if any(g.shape != ref_grads[n].shape for n, g in grads.items()):
        return False
    gaps = _gaps(got, ref, ratio=True)
    d = _deviation(gaps)
    if d.outputs > norm or (d.gradients is not None and d.gradients > norm) or _worst(gaps) > element:
        return False
    for n, allowed in (noise or {}).items():
        g = gaps[1].get(n)
        if g is not None and not g.diff <= NOISE * allowed + element * g.size + 1e-30:
            return False
    return True


def _relative(diff: float, scale: float) -> float:
    return diff / max(scale, 1e-30) if math.isfinite(diff) else math.inf


def _deviation(gaps: _Gaps, dtype: str = "float32") -> Deviation:
    outs, grads = gaps
    outputs = max((_relative(g.diff, g.size) for g in outs), default=0.0)
    if not grads:
        return Deviation(outputs, None, dtype)
    return Deviation(outputs, _relative(*_together(grads)), dtype)


def deviation_of(results: Results, ref: Results, dtype: str = "float32") -> Deviation:
    return _deviation(_gaps(results, ref, ratio=False), dtype)
