"""The repair's check: a repaired model within float32's rounding of the original is accepted
without a float64 pass; one beyond it is judged in float64, where a changed formula shows."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from nhwc_audit import convert
from nhwc_audit.fix import deviation, equivalence, results
from tests import models as M


def _sample() -> list[results.Sample]:
    torch.manual_seed(0)
    return [((torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last),), {})]


def test_a_conversion_that_only_rounds_is_accepted_without_float64(float64_passes: list[int]) -> None:
    model = M.InstanceNormNet().train()
    float64 = float64_passes
    assert equivalence.first_change(model, convert(model), convert(model), _sample(), grads=True) is None
    assert float64 == []


@pytest.mark.parametrize("scale", [1e-3, 1e-4])
def test_a_changed_formula_is_judged_and_refused_in_float64(scale: float, float64_passes: list[int]) -> None:
    model = M.InstanceNormNet().train()
    changed = convert(copy.deepcopy(model))
    with torch.no_grad():
        changed.conv2.weight.mul_(1 + scale)  # a formula off by 0.1% or 0.01%
    float64 = float64_passes
    problem = equivalence.first_change(model, convert(model), changed, _sample(), grads=True)
    assert problem is not None and problem.endswith("(float64)")
    assert float64  # judged there


def test_the_checks_share_the_originals_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """One repair runs the original model once in its own dtype, whatever the number of checks."""
    model = M.InstanceNormNet().train()
    runs: list[int] = []
    real = results.outputs

    def counting(m: Any, *a: Any, **kw: Any) -> Any:
        if m.__class__.__name__ == "InstanceNormNet" and not a[0][0].is_contiguous(memory_format=torch.channels_last):
            runs.append(1)
        return real(m, *a, **kw)

    monkeypatch.setattr(results, "outputs", counting)
    reference: dict[str, Any] = {}
    for _ in range(3):
        assert equivalence.first_change(model, convert(model), convert(model), _sample(), True, reference) is None
    deviation.deviations(model, convert(model), convert(model), _sample()[0], True, reference)
    assert runs == [1]


def test_the_logs_deviation_reuses_the_last_checked_graphs_results(monkeypatch: pytest.MonkeyPatch) -> None:
    model = M.InstanceNormNet().train()
    trial = torch.fx.symbolic_trace(convert(model))
    again = torch.fx.GraphModule(trial, copy.deepcopy(trial.graph))  # another copy of the same graph
    reference: dict[str, Any] = {}
    assert equivalence.first_change(model, convert(model), trial, _sample(), True, reference) is None
    ran: list[str] = []
    real = results.outputs

    def counting(m: Any, *a: Any, **kw: Any) -> Any:
        ran.append(type(m).__name__)
        return real(m, *a, **kw)

    monkeypatch.setattr(results, "outputs", counting)
    mine, naive, exact = deviation.deviations(model, convert(model), again, _sample()[0], True, reference)
    assert ran == []  # the original's, the naive conversion's and the graph's results were kept
    assert naive is not None and mine is not None and mine.outputs < results.ROUNDING
    assert exact is None  # within rounding: float64 is not asked


class _FlipsTheBatch(torch.nn.Module):
    """``model``'s outputs with the batch in reverse order: the same at batch 1, another formula
    as soon as a batch holds two items (the kind of fault a rewrite that mixes the batch has)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x).flip(0)
        return out


def _float64_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of each float64 pass's input."""
    batches: list[int] = []
    real = results.outputs

    def seen(m: Any, args: Any, kwargs: Any, grads: bool, **kw: Any) -> Any:
        if args[0].dtype == torch.float64:
            batches.append(args[0].shape[0])
        return real(m, args, kwargs, grads, **kw)

    monkeypatch.setattr(results, "outputs", seen)
    return batches


def _batch_of(n: int) -> list[results.Sample]:
    torch.manual_seed(0)
    return [((torch.randn(n, 3, 8, 8).contiguous(memory_format=torch.channels_last),), {})]


def test_the_float64_check_runs_on_two_items_of_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float64 pass costs ~7x a float32 one: a batch of 8 is checked there on its first two
    items, which still show a rewrite that mixes the batch."""
    model = M.InstanceNormNet().train()
    batches = _float64_batches(monkeypatch)
    problem = equivalence.first_change(model, convert(model), _FlipsTheBatch(convert(model)), _batch_of(8), grads=True)
    assert problem is not None and problem.endswith("(float64)")
    assert batches and set(batches) == {equivalence.FLOAT64_ITEMS} == {2}


class _FixedBatch(torch.nn.Module):
    """Runs at its own batch size only (``view(8, ...)``), like models with a batch in a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out: torch.Tensor = y.reshape(8, 4 * 8 * 8)
        return out


def test_a_model_that_cannot_run_on_two_items_is_checked_in_float64_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _FixedBatch()
    batches = _float64_batches(monkeypatch)
    changed = convert(copy.deepcopy(model))
    with torch.no_grad():
        changed.conv.weight.mul_(1 + 1e-3)
    problem = equivalence.first_change(model, convert(model), changed, _batch_of(8), grads=True)
    assert problem is not None and problem.endswith("(float64)")
    assert batches[0] == 2 and set(batches[1:]) == {8}  # tried on two items, then whole
    assert equivalence.first_change(model, convert(model), convert(model), _batch_of(8), grads=True) is None


class _Outputs(torch.nn.Module):
    """``model``'s output and its argmax over channels (plus ``shift``), or flattened."""

    def __init__(self, model: torch.nn.Module, shift: int = 0, flat: bool = False) -> None:
        super().__init__()
        self.model, self.shift, self.flat = model, shift, flat

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.model(x)
        return (y.flatten(1) if self.flat else y), y.argmax(1) + self.shift


@pytest.mark.parametrize(("shift", "flat"), [(1, False), (0, True)])
def test_another_integer_output_or_shape_is_never_taken_for_rounding(shift: int, flat: bool) -> None:
    # the relative deviation reads floating outputs of one shape only: an integer output that
    # changed, or an output of another shape, must not pass the float32 check for want of pairs
    model = _Outputs(M.InstanceNormNet().train())
    trial = _Outputs(convert(copy.deepcopy(model.model)), shift, flat)
    problem = equivalence.first_change(model, convert(copy.deepcopy(model)), trial, _sample(), grads=True)
    assert problem is not None and problem.endswith("(float64)")
    assert ("output 1" in problem) if shift else ("shape" in problem)


def test_a_trial_is_first_asked_in_its_own_dtype_where_converting_stays_within_rounding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the naive conversion is within rounding of the original, a trial most often is too:
    it is asked so first, and its results are the log's deviation; the float64 islands run only
    when it is not. Where the conversion is not (a CPU kernel's error), the islands come first."""
    from nhwc_audit.fix import islands

    model = M.ConvBnRelu().eval()
    trial, naive = torch.fx.symbolic_trace(convert(model)), torch.fx.symbolic_trace(convert(model))
    islands_ran: list[int] = []
    real_run = islands.Float64Run.__call__

    def counting(self: Any, *a: Any, **kw: Any) -> Any:
        islands_ran.append(1)
        return real_run(self, *a, **kw)

    monkeypatch.setattr(islands.Float64Run, "__call__", counting)
    reference: dict[str, Any] = {}
    assert equivalence.first_change(model, naive, trial, _sample(), True, reference) is None
    assert reference["quiet"] and islands_ran == [] and reference["trial"]
    noisy: dict[str, Any] = {"quiet": False}  # as a conversion beyond rounding leaves it
    assert equivalence.first_change(model, naive, trial, _sample(), True, noisy) is None
    assert len(islands_ran) == len(_sample()) and "trial" not in noisy
