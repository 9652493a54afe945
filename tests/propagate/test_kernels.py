"""A backward kernel whose result depends on the layout of the gradient it is handed is named in
the notes of a --train audit, as measured on the torch the tests run on: the tests ask plain
torch the same question and expect the audit's answer to match it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nhwc_audit import audit
from tests import models as M


def _torch_says_it_differs(shape: tuple[int, ...]) -> bool:
    """The oracle, in plain torch: InstanceNorm's input gradient for a channels_last gradient
    against the same gradient in NCHW, and against float64."""
    torch.manual_seed(1)
    x, dy = torch.randn(shape), torch.randn(shape)

    def dx(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        t = t.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(F.instance_norm(t), t, g)
        return got.double()

    exact = dx(x.double(), dy.double())
    cl = dx(x, dy.contiguous(memory_format=torch.channels_last))
    return float((cl - exact).norm() / exact.norm()) > 1e-3


@pytest.mark.parametrize("batch", [1, 2])
def test_a_train_audit_names_an_instancenorm_whose_backward_depends_on_the_gradients_layout(batch: int) -> None:
    torch.manual_seed(0)
    r = audit(M.InstanceNormNet(), torch.randn(batch, 3, 16, 16), bandwidth=1e9, train=True)
    norm = next(n for n in r.nodes if n.name == "norm")
    assert norm.grads and norm.grads[0].layout.value == "channels_last"  # what the note is about
    noted = [n for n in r.meta.capture_notes if n.startswith("backward: InstanceNorm (norm)")]
    assert bool(noted) == _torch_says_it_differs((batch, 8, 16, 16))
    if noted:
        assert f"at {batch}x8x16x16 float32" in noted[0] and "wrong input gradient" in noted[0]


def test_nothing_is_measured_without_a_backward_pass_or_on_fake_tensors() -> None:
    x = torch.randn(1, 3, 16, 16)
    assert not any("InstanceNorm (norm)" in n for n in audit(M.InstanceNormNet(), x, bandwidth=1e9).meta.capture_notes)
    fake = audit(M.InstanceNormNet(), x, bandwidth=1e9, train=True, mode="fake")
    assert not any(n.startswith("backward: InstanceNorm") for n in fake.meta.capture_notes)
