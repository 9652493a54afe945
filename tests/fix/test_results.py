"""A checking run's private copy: parameters shared, buffers its own, for GraphModules too
(whose own deepcopy generates their code again)."""

from __future__ import annotations

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
