"""A repaired graph fixes forward's Python decisions on ``self.training`` as they were when traced:
timm's ``BatchNormAct2d`` (batch or running statistics), ``F.dropout(..., training=self.training)``.
``.train()`` on a model repaired in eval mode then kept eval's path (a helper's sweep: coatnet,
efficientformerv2 and fastvit trained on running statistics, off by 1.2, 1.6 and 0.95), and nothing
said so; the repair log now does, where forward traces otherwise in the other mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nhwc_audit


class _FunctionalNorm(nn.BatchNorm2d):
    """timm's BatchNormAct2d: which statistics it uses is decided in Python, and it counts batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1)


class _Net(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm = _FunctionalNorm(8) if functional else nn.BatchNorm2d(8)
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.a(x)).contiguous()  # (a revert the repair removes)
        if self.functional:
            y = F.dropout(y, 0.1, training=self.training)
        return self.b(y)


@pytest.mark.parametrize("training", [False, True])
def test_the_repair_says_when_forward_takes_another_path_in_the_other_mode(training: bool) -> None:
    torch.manual_seed(0)
    model, x = _Net(functional=True).train(training), torch.randn(2, 3, 16, 16)
    counted = int(model.norm.num_batches_tracked)
    gm, log = nhwc_audit.repair(model, x)
    assert log.steps
    (note,) = [n for n in log.notes if "mode" in n]
    now, other = ("train", "eval") if training else ("eval", "train")
    assert f"in {now} mode" in note and f".{other}()" in note and "test_repair_modes.py" in note, note
    assert int(model.norm.num_batches_tracked) == counted  # the traces ran on the audit's copies
    assert model.training is training


def test_no_note_where_forward_traces_alike_in_both_modes() -> None:
    torch.manual_seed(0)
    model, x = _Net(functional=False).eval(), torch.randn(2, 3, 16, 16)
    _, log = nhwc_audit.repair(model, x)
    assert log.steps and not [n for n in log.notes if "mode" in n]
    # and the leaf BatchNorm follows .train() on the repaired model as on the model
    gm, _ = nhwc_audit.repair(model, x)
    gm.train()
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(gm(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_a_module_the_model_keeps_in_eval_is_traced_as_it_is() -> None:
    """A model in training with a frozen norm kept in eval (``self.norm.eval()``): the repair traces
    the norm's eval path, and the note compared all-train with all-eval copies, naming the frozen
    norm's line as a path the repaired graph fixed. Traced as the model is, only the dropout differs."""
    torch.manual_seed(0)
    model, x = _Net(functional=True).train(), torch.randn(2, 3, 16, 16)
    model.norm.eval()
    _, log = nhwc_audit.repair(model, x)
    (note,) = [n for n in log.notes if "mode" in n]
    assert "in train mode" in note and "test_repair_modes.py:36" in note, note  # the dropout's line, not the norm's


class _NoDropout(nn.Module):
    """Dropout with p=0 asked ``self.training`` (diffusers' and timm's default rates): the same op in
    either mode, which traces with another ``training`` argument only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.dropout(self.a(x).contiguous(), 0.0, self.training)
        y = F.dropout2d(y, p=0.0, training=self.training)
        return self.b(torch.dropout(y, 0, self.training))


def test_no_note_for_a_dropout_that_drops_nothing() -> None:
    torch.manual_seed(0)
    _, log = nhwc_audit.repair(_NoDropout().train(), torch.randn(2, 3, 16, 16))
    assert log.steps and not [n for n in log.notes if "mode" in n], log.notes
