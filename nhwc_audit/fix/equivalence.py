"""Does a repaired model compute what the original computes? Outputs and parameter gradients
of a fixed random linear loss, on the sample and a second input: first in the model's own dtype,
where a repaired model within the rounding a layout change costs (:data:`~.results.ROUNDING`)
is accepted, of the naive conversion with its rewritten nodes computed in float64
(:mod:`.islands`), or of the original; beyond it, in float64, where that rounding vanishes
(~1e-12) and a changed formula still shows; in the model's own dtype with a tolerance calibrated
on the naive conversion when the model cannot run in float64.

A float64 forward and backward costs ~7x a float32 one on a CPU (no oneDNN kernels; the bundled
UNet at 128x128: 166-187 ms against 25-27 ms): most rewrites (a view made a reshape, an operand
order, an allocation's layout, a kernel that only rounds more) skip it; a batched sample is
checked there on its first two items (:data:`FLOAT64_ITEMS`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..prepare.copy import first_float_dtype
from ..propagate.compare import IndexedJudge, first_difference, tensor_difference
from ..propagate.runner import batch_of, first_sample
from ..tensors import to_nchw
from . import results as res
from .deviation import double, graph_key
from .islands import against_naive, naive_results
from .results import ELEMENTS, ROUNDING, Results, Sample, within

__all__ = ["FLOAT64_ITEMS", "first_change"]


def _deviation(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float((other.double() - ref.double()).norm())


FLOAT64_ITEMS = 2
"""The float64 check runs on the first items of a batched sample (a float64 pass costs ~7x a
float32 one on a CPU): two, so that a rewrite that mixes the items of a batch still shows."""


def _float64_samples(samples: list[Sample]) -> list[list[Sample]]:
    """The samples in float64, in the order to try them: cut to their first
    :data:`FLOAT64_ITEMS` items when batched beyond that, then whole."""
    whole = [(tree_map(double, a), tree_map(double, k)) for a, k in samples]
    cut = [first_sample(a, k, batch_of(a, k), FLOAT64_ITEMS) for a, k in whole]
    return [[c for c in cut if c is not None], whole] if all(c is not None for c in cut) else [whole]


def _float64_reference(
    model: nn.Module, samples: list[Sample], grads: bool, reference: dict[str, Any]
) -> list[Any] | None:
    """(args, kwargs, outputs, gradients) of the original model in float64 (NCHW inputs) on each
    of the samples as the float64 check runs them (:func:`_float64_samples`: the first two items
    of a batch, the whole sample when the model cannot run on them); None when it cannot run in
    float64."""
    try:
        # a full copy: Module.double() rewrites param.data, and fresh_copy shares parameters
        m64 = copy.deepcopy(model).double()
    except Exception:
        return None
    for samples64 in _float64_samples(samples):
        try:
            return [
                (
                    a,
                    k,
                    *res.outputs(
                        res.fresh_copy(m64), tree_map(to_nchw, a), tree_map(to_nchw, k), grads, reference=reference
                    ),
                )
                for a, k in samples64
            ]
        except Exception:
            continue
    return None


def first_change(
    model: nn.Module,
    naive: nn.Module | None,
    trial: nn.Module,
    samples: list[Sample],
    grads: bool,
    reference: dict[str, Any] | None = None,
) -> str | None:
    """Does ``trial`` compute what ``model`` computes? In float32 (the model's own dtype), a
    trial within :data:`~.results.ROUNDING` of the naive conversion ``naive`` (None: it cannot
    run), its rewritten nodes computed in float64, does, where the naive conversion itself is
    near the original and the rewritten kernels round as kernels do
    (:func:`.islands.against_naive`); so does one within it of the original; beyond both,
    float64 decides, where layout-induced rounding differences vanish (~1e-12) and a changed
    formula still shows at the size of the values; in the model's own dtype, with a tolerance
    calibrated on the naive conversion, when the model cannot run in float64. ``reference``: a
    dict kept between the checks of one repair (same model and samples), where the original's
    and the naive conversion's results are computed once."""
    reference = {} if reference is None else reference
    own = _originals(model, samples, grads, reference)
    # where converting alone stays within rounding, so most often does the trial in its own dtype:
    # asked first, its results on the sample are the log's deviation too (one forward and
    # backward fewer than the float64 islands and then the deviation)
    if own is not None:
        quiet = naive is not None and _quiet_conversion(naive, samples, grads, own, reference)
        if quiet and _within_original(trial, samples, grads, own, reference):
            return None
        if naive is not None and against_naive(naive, trial, samples, grads, own, reference):
            return None
        if not quiet and _within_original(trial, samples, grads, own, reference):
            return None
    if "float64" not in reference:
        reference["float64"] = _float64_reference(model, samples, grads, reference)
    if reference["float64"] is None:
        return _first_change_calibrated(model, naive, trial, samples, grads)
    try:
        t64 = copy.deepcopy(trial).double()
    except Exception:
        return _first_change_calibrated(model, naive, trial, samples, grads)
    for i, (args, kwargs, oa, ga) in enumerate(reference["float64"]):
        ob, gb = res.outputs(res.fresh_copy(t64), args, kwargs, grads, reference=reference)
        why = _float64_difference((ob, gb), (oa, ga))
        if why is not None and not _as_naive_in_float64(naive, i, (ob, gb), oa, reference, grads):
            return why
    return None


def _quiet_conversion(
    naive: nn.Module, samples: list[Sample], grads: bool, own: list[Results], reference: dict[str, Any]
) -> bool:
    """The naive conversion's results are within rounding of the original's on every sample."""
    if "quiet" not in reference:
        naives = naive_results(naive, samples, grads, own, reference)
        reference["quiet"] = naives is not None and all(
            within(n, o, ROUNDING, ELEMENTS) for n, o in zip(naives, own, strict=True)
        )
    return bool(reference["quiet"])


def _within_original(
    trial: nn.Module, samples: list[Sample], grads: bool, own: list[Results], reference: dict[str, Any]
) -> bool:
    """``trial``'s results in the model's own dtype are within rounding of the original's on every
    sample, each parameter's gradient within its noise (naive against original) when known."""
    noises = reference.get("noise") or [None] * len(samples)
    return all(
        within(_trial_results(trial, a, k, grads, reference, first=i == 0), ref, ROUNDING, ELEMENTS, noise)
        for i, ((a, k), ref, noise) in enumerate(zip(samples, own, noises, strict=True))
    )


def _float64_difference(got: Results, ref: Results) -> str | None:
    """How float64 results differ beyond float64 rounding, or None."""
    (ob, gb), (oa, ga) = got, ref
    diff = first_difference(ob, oa, rtol=1e-6, atol=1e-9)
    if diff is not None:
        return f"{diff} (float64)"
    scale = max((float(g.abs().max()) for g in ga.values()), default=0.0)
    for name, g in ga.items():
        if name in gb and tensor_difference(gb[name], g, rtol=1e-6, atol=1e-9 * max(scale, 1.0)) is not None:
            return f"gradient of {name} differs (float64)"
    return None


def _as_naive_in_float64(
    naive: nn.Module | None, i: int, got: Results, outs: list[torch.Tensor], reference: dict[str, Any], grads: bool
) -> bool:
    """Does the naive conversion, in float64 on float64 sample ``i``, compute ``got`` too, with the
    original's outputs (``outs``)? Then the rewrites changed nothing the converted model computes,
    and the gradients that differ from the original's differ by the conversion: a backward kernel
    that computes otherwise in one layout (torch 2.14.1's CPU BatchNorm backward at batch 1 with a
    channels_last-strided gradient: the original's is wrong); the log reports the naive
    conversion's own deviation. A conversion that changes the outputs (code that reads the memory
    order) is no reference."""
    if naive is None:
        return False
    if "naive64" not in reference:
        reference["naive64"] = None
        try:
            n64 = copy.deepcopy(naive).double()
            reference["naive64"] = [
                res.outputs(res.fresh_copy(n64), a, k, grads, reference=reference) for a, k, *_ in reference["float64"]
            ]
        except Exception:
            pass
    theirs = reference["naive64"]
    if theirs is None or first_difference(theirs[i][0], outs, rtol=1e-6, atol=1e-9) is not None:
        return False
    ob, gb = got
    return _float64_difference((ob, gb), (theirs[i][0], {n: g for n, g in theirs[i][1].items() if n in gb})) is None


def _first_change_calibrated(
    model: nn.Module,
    naive: nn.Module | None,
    trial: nn.Module,
    samples: list[Sample],
    grads: bool,
) -> str | None:
    """Compare the repaired ``trial`` (NHWC input) with the original ``model`` (NCHW input).

    Converting to channels_last alone changes float summation order, so deviations are
    judged against the naive channels_last model's own deviation from the original: a
    rewrite may deviate at most 4x as much plus 1e-4 of the value's norm (the naive model may
    not run at all: it breaks where the repair fixes a view). A rewrite that changes the math
    deviates by the size of the values themselves.
    """
    for args, kwargs in samples:
        oa, ga = res.outputs(res.fresh_copy(model), tree_map(to_nchw, args), tree_map(to_nchw, kwargs), grads)
        on, gn = list(oa), dict(ga)  # no noise estimate: the relative floor alone
        if naive is not None:
            try:
                on, gn = res.outputs(res.fresh_copy(naive), args, kwargs, grads)
            except Exception:
                pass
        ob, gb = res.outputs(res.fresh_copy(trial), args, kwargs, grads)
        if len(on) != len(oa):
            on = list(oa)
        diff = first_difference(ob, oa, judge=_noise_judge(on))
        if diff is not None:
            return diff
        for name, g in ga.items():
            if name in gb and name in gn and _within_noise(gb[name], g, gn[name]) is not None:
                return f"gradient of {name} differs"
    return None


def _noise_judge(naive: list[torch.Tensor]) -> IndexedJudge:
    """Judge output ``i`` against the naive conversion's output ``i``."""

    def judge(i: int, actual: torch.Tensor, expected: torch.Tensor) -> str | None:
        return _within_noise(actual, expected, naive[i])

    return judge


def _within_noise(actual: torch.Tensor, expected: torch.Tensor, naive: torch.Tensor) -> str | None:
    """None when ``actual`` deviates from ``expected`` at most 4x as much as the naive
    conversion does, plus 1e-4 of the value's norm."""
    allowed = 4 * _deviation(expected, naive) + 1e-4 * float(expected.double().norm()) + 1e-6
    got = _deviation(expected, actual)
    return None if got <= allowed else f"deviates by {got:.3g}, allowed {allowed:.3g}"


def _trial_results(
    trial: nn.Module, args: Any, kwargs: Any, grads: bool, reference: dict[str, Any], first: bool
) -> Results:
    """``trial``'s results on a sample; on the first sample, kept by graph for the log's
    deviation (the repaired graph is most often the last one checked)."""
    got = res.outputs(res.fresh_copy(trial), args, kwargs, grads, reference=reference)
    key = graph_key(trial)
    if first and key is not None:
        reference.setdefault("trial", {})[key] = got
    return got


def _originals(model: nn.Module, samples: list[Sample], grads: bool, reference: dict[str, Any]) -> list[Results] | None:
    """The original model's results in its own dtype on each sample (NCHW inputs), computed once
    per repair; None for a model in another dtype than float32 (its rounding is not float32's)
    or one that cannot run them."""
    if "own" not in reference:
        reference["own"] = None
        if first_float_dtype(model) in (torch.float32, None):
            try:
                reference["own"] = [
                    res.outputs(
                        res.fresh_copy(model), tree_map(to_nchw, a), tree_map(to_nchw, k), grads, reference=reference
                    )
                    for a, k in samples
                ]
            except Exception:
                pass
    own: list[Results] | None = reference["own"]
    return own
