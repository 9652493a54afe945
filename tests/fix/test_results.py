"""A checking run's private copy: parameters shared, buffers its own, for GraphModules too
(whose own deepcopy generates their code again)."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from nhwc_audit.fix.results import fresh_copy, outputs


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)).train()


def test_a_graph_modules_copy_runs_its_graph_with_its_own_buffers() -> None:
    gm = torch.fx.symbolic_trace(_net())
    stats = gm.get_submodule("1").running_mean.clone()
    mine = fresh_copy(gm)
    assert isinstance(mine, torch.fx.GraphModule) and mine.graph is gm.graph
    x = torch.randn(2, 3, 8, 8)
    got = outputs(mine, (x,), {}, grads=True)
    assert torch.equal(gm.get_submodule("1").running_mean, stats)  # the original's statistics stay
    assert not torch.equal(mine.get_submodule("1").running_mean, stats)  # the copy's moved
    assert mine.get_submodule("0").weight is gm.get_submodule("0").weight
    assert mine.get_submodule("0") is not gm.get_submodule("0")
    ref = outputs(fresh_copy(gm), (x,), {}, grads=True)
    assert all(torch.equal(a, b) for a, b in zip(got[0], ref[0], strict=True))
    assert got[1].keys() == ref[1].keys() == {n for n, _ in gm.named_parameters()}
    assert all(torch.equal(got[1][n], ref[1][n]) for n in got[1])


def test_a_modules_copy_shares_parameters_and_not_buffers() -> None:
    model = _net()
    mine = fresh_copy(model)
    assert mine[0].weight is model[0].weight
    assert mine[1].running_var is not model[1].running_var
    assert torch.equal(mine[1].running_var, model[1].running_var)


def test_a_graph_modules_plain_tensor_attributes_are_its_copys_own() -> None:
    # torch.export keeps lifted constants as plain attributes; a graph may write to them
    g = torch.fx.Graph()
    x = g.placeholder("x")
    count = g.get_attr("count")
    g.output(g.call_function(torch.mul, (x, g.call_method("add_", (count, 1)))))
    root = nn.Module()
    root.count = torch.zeros(1)
    gm = torch.fx.GraphModule(root, g)
    del gm._buffers["count"]  # GraphModule made it a buffer
    gm.count = torch.zeros(1)
    assert "count" in gm.__dict__
    for _ in range(3):
        outputs(fresh_copy(gm), (torch.ones(2),), {}, grads=False)
    assert float(gm.count) == 0.0


def test_differences_of_finite_values_and_of_equal_non_finite_ones() -> None:
    """Two results that differ by a few elements, then the same with an infinity and a NaN in
    the same places of both: the non-finite values count for nothing, the others as before."""
    from nhwc_audit.fix.results import deviation_of, gradient_noise, within, worst_element

    g = torch.Generator().manual_seed(0)
    ref_out, ref_grad = torch.randn(64, generator=g), torch.randn(16, generator=g)
    out, grad = ref_out.clone(), ref_grad.clone()
    out[3] += 0.01
    grad[5] -= 0.02
    plain = deviation_of(([out], {"w": grad}), ([ref_out], {"w": ref_grad}))
    assert plain.outputs == pytest.approx(0.01 / float(ref_out.norm()), rel=1e-5)
    assert plain.gradients == pytest.approx(0.02 / float(ref_grad.norm()), rel=1e-5)

    def spoiled(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, torch.tensor([float("inf"), float("nan")])])

    results = ([spoiled(out)], {"w": spoiled(grad)})
    ref = ([spoiled(ref_out)], {"w": spoiled(ref_grad)})
    assert deviation_of(results, ref) == plain
    # the non-finite places count as zeros in the output's median size
    assert worst_element(results, ref) == pytest.approx(
        worst_element(([out], {"w": grad}), ([ref_out], {"w": ref_grad})), rel=0.05
    )
    assert gradient_noise(results, ref) == {"w": pytest.approx(0.02, rel=1e-5)}
    assert within(results, ref, 1.0, 1.0) and not within(results, ref, 1e-5, 1.0)
    finite_there = ([torch.cat([out, torch.tensor([1.0, float("nan")])])], {"w": spoiled(grad)})
    assert deviation_of(finite_there, ref).outputs == float("inf")
    assert worst_element(finite_there, ref) == float("inf") and not within(finite_there, ref, 1.0, 1.0)


def test_a_deviation_does_not_depend_on_the_order_gradients_come_in() -> None:
    """A graph of a model registers its parameters in call order, the model in its own: the
    norms are summed in the reference's order whatever the run's."""
    from nhwc_audit.fix.results import deviation_of

    # squared differences 1 and eight of 2**-54: 1 + 2**-54 rounds to 1, eight of them add to 2**-51
    ref = {n: torch.tensor([1.0, 0.0]) for n in "abcdefghi"}
    moved = {n: torch.tensor([1.0, 1.0 if n == "a" else 2.0**-27]) for n in ref}
    backwards = dict(reversed(list(moved.items())))
    a = deviation_of(([], moved), ([], ref)).gradients
    b = deviation_of(([], backwards), ([], ref)).gradients
    assert a is not None and a.hex() == b.hex()  # type: ignore[union-attr]


@pytest.mark.parametrize("draw", ["dropout", "rand_like", "normal_", "bernoulli"])
def test_random_draws_in_the_checks_are_one_whatever_the_layout(draw: str) -> None:
    """The repair's checks compare a model in NCHW with one in channels_last from one seed: their
    draws are made in logical order (``LogicalDraws``), and the result keeps its layout."""
    import torch.nn.functional as F

    from nhwc_audit.propagate.dispatch import LogicalDraws

    made = {
        "dropout": lambda t: F.dropout(t, 0.5, True),
        "rand_like": torch.rand_like,
        "normal_": lambda t: torch.empty_like(t).normal_(),
        "bernoulli": lambda t: torch.bernoulli(torch.full_like(t, 0.5)),
    }[draw]
    x = torch.randn(2, 8, 5, 5)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    eager = made(cl)
    with LogicalDraws():
        torch.manual_seed(0)
        nchw = made(x)
        torch.manual_seed(0)
        logical = made(cl)
    assert torch.equal(nchw, logical)
    # (the CPU's bernoulli(p) of a tensor p draws in logical order already; the others do not)
    assert torch.equal(nchw, eager) == (draw == "bernoulli")
    assert logical.is_contiguous(memory_format=torch.channels_last) and not logical.is_contiguous()


class _Counted(nn.Module):
    """A conv (and a dropout): a check's run of it, in NCHW or channels_last."""

    def __init__(self, dropout: bool) -> None:
        super().__init__()
        self.conv, self.drop = nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(0.5) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x))


@pytest.mark.parametrize("dropout", [False, True])
def test_a_check_runs_under_no_mode_unless_the_model_draws(dropout: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run under any Python dispatch mode can take other kernel paths than the user's: timm
    efficientformer_l1's NCHW model at batch 1 gets BatchNorm gradients 0.9 off float64 without one
    and right under one, so the checks said the conversion moved its gradients 4.8e-6, where the
    user's two models' differ by 1.8. A check's first run is made under the mode that orders random
    draws, which sees whether the model draws (from a forked generator too); one that drew none is made
    again without it, as are the next."""
    from nhwc_audit.propagate.dispatch import LogicalDraws

    entered: list[int] = []  # (one mode per run: entered for its forward and its backward)
    init = LogicalDraws.__init__
    monkeypatch.setattr(LogicalDraws, "__init__", lambda self: entered.append(1) or init(self))
    torch.manual_seed(0)
    model, x = _Counted(dropout).train(), torch.randn(2, 3, 8, 8)
    under: list[bool] = []  # each forward: whether it ran under the mode

    def watched(m: nn.Module) -> nn.Module:
        stack = torch.utils._python_dispatch._get_current_dispatch_mode_stack
        m.register_forward_pre_hook(lambda *_: under.append(any(isinstance(d, LogicalDraws) for d in stack())))
        return m

    cl = watched(fresh_copy(model).to(memory_format=torch.channels_last))
    reference: dict[str, object] = {}
    nchw = outputs(watched(fresh_copy(model)), (x,), {}, True, reference=reference)
    assert reference["draws"] is dropout and len(entered) == 1
    got = outputs(cl, (x.contiguous(memory_format=torch.channels_last),), {}, True, reference=reference)
    assert len(entered) == (2 if dropout else 1)
    assert under == ([True, True] if dropout else [True, False, False])  # (learnt under it, then run without)
    torch.testing.assert_close(got[0], nchw[0])  # one dropout mask whatever the layout
    torch.testing.assert_close(got[1], nchw[1])


class _ForkedNoise(nn.Module):
    """Noise drawn under ``torch.random.fork_rng()``: the global generator is left as it was."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        with torch.random.fork_rng():
            return y + 0.1 * torch.randn_like(y)


def test_a_check_sees_draws_under_a_forked_generator() -> None:
    """A model that draws under ``fork_rng`` leaves the generator's state as it was: a check that read
    the state saw no draw and ran without the mode, so NCHW and channels_last drew other noise."""
    torch.manual_seed(0)
    model, x = _ForkedNoise().eval(), torch.randn(2, 3, 8, 8)
    reference: dict[str, object] = {}
    nchw = outputs(fresh_copy(model), (x,), {}, False, reference=reference)
    cl = fresh_copy(model).to(memory_format=torch.channels_last)
    got = outputs(cl, (x.contiguous(memory_format=torch.channels_last),), {}, False, reference=reference)
    assert reference["draws"] is True
    torch.testing.assert_close(got[0], nchw[0])
