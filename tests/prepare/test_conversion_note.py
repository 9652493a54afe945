"""A model that ``model.to(memory_format=...)`` cannot convert (4D and 5D parameters: timm's
LambdaLayer holds a Conv3d in a 2D network): the audit converts each tensor by its rank, as
``nhwc_audit.convert`` does, and says so, where the call the user would make raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nhwc_audit
from nhwc_audit.prepare.notes import conversion_note


class Conv3dInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.c3 = nn.Conv3d(1, 4, (3, 3, 1), padding=(1, 1, 0))
        self.p = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        return self.p(y + self.c3(y.unsqueeze(1)).mean(1))


def test_a_model_the_standard_call_cannot_convert_is_audited_with_a_note() -> None:
    model = Conv3dInside().eval()
    with pytest.raises(RuntimeError, match="required rank 4"):
        Conv3dInside().to(memory_format=torch.channels_last)
    report = nhwc_audit.audit(model, torch.randn(1, 3, 8, 8), bandwidth=1e9)
    (note,) = [n for n in report.meta.capture_notes if "raises on this model" in n]
    assert note.startswith("model.to(memory_format=torch.channels_last) raises on this model")
    assert "5D parameters or buffers (c3.weight)" in note and "nhwc_audit.convert(model)" in note
    converted = nhwc_audit.convert(model)  # what the note advises works, and is what was audited
    assert converted.c3.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert converted.c.weight.is_contiguous(memory_format=torch.channels_last)
    assert note in report.to_dict()["capture_notes"]


def test_no_note_where_the_standard_call_works() -> None:
    for model, rank in ((nn.Conv2d(3, 8, 3), 4), (nn.Conv3d(3, 8, 3), 5), (nn.Linear(3, 8), None)):
        fmt = torch.channels_last_3d if rank == 5 else torch.channels_last
        assert conversion_note(model, rank) is None
        model.to(memory_format=fmt)  # eager: it converts (and the model is then told it is converted already)


def test_a_3d_model_holding_a_4d_parameter_names_channels_last_3d() -> None:
    model = nn.Sequential(nn.Conv3d(2, 4, 1))
    model.register_buffer("table", torch.zeros(1, 2, 3, 4))
    with pytest.raises(RuntimeError):
        model.to(memory_format=torch.channels_last_3d)
    note = conversion_note(model, 5)
    assert note is not None and note.startswith("model.to(memory_format=torch.channels_last_3d) raises")
    assert "4D parameters or buffers (table)" in note


def test_a_2d_input_into_a_model_of_5d_weights_only_gets_the_note() -> None:
    model = nn.Sequential(nn.Conv3d(1, 4, 1))
    with pytest.raises(RuntimeError, match="required rank 4"):
        nn.Sequential(nn.Conv3d(1, 4, 1)).to(memory_format=torch.channels_last)
    note = conversion_note(model, 4)
    assert note is not None and "5D parameters or buffers (0.weight, 0.bias)" not in note
    assert "5D parameters or buffers (0.weight)" in note
    assert conversion_note(model, 5) is None and conversion_note(model, None) is None


@pytest.mark.parametrize("rank", [4, 5])
def test_a_one_channel_input_gets_a_note_on_converting_it(rank: int) -> None:
    """Eager: ``x.to(memory_format=...)`` of a one-channel input strides the channel 1, where
    ``x.contiguous(memory_format=...)`` leaves it row-major; a 1x1 convolution then computes
    channels_last from the first and NCHW from the second. The audit converts as ``.to()``
    does, and says so."""
    from nhwc_audit import audit

    fmt = torch.channels_last_3d if rank == 5 else torch.channels_last
    conv = (nn.Conv3d if rank == 5 else nn.Conv2d)(1, 4, 1).to(memory_format=fmt)
    x = torch.randn(1, 1, *([6] * (rank - 2)))
    assert x.to(memory_format=fmt).stride()[1] == 1 and x.contiguous(memory_format=fmt).is_contiguous()
    if rank == 4:  # (a CPU Conv3d of a volume this small picks NCDHW either way)
        with torch.no_grad():
            assert conv(x.to(memory_format=fmt)).is_contiguous(memory_format=fmt)
            assert conv(x.contiguous(memory_format=fmt)).is_contiguous()
    notes = audit(conv, x, bandwidth=1e9).meta.capture_notes
    assert any("has one channel" in n and f"x.to(memory_format=torch.{str(fmt)[6:]})" in n for n in notes), notes
    three = torch.randn(1, 3, *([6] * (rank - 2)))
    assert not any(
        "one channel" in n for n in audit(nn.Conv2d(3, 4, 1), three[..., 0] if rank == 5 else three).meta.capture_notes
    )


def test_a_train_audit_of_a_model_in_eval_mode_says_so() -> None:
    """`--train` on a build function that returns `model.eval()` audited a backward through eval-mode
    BatchNorm, with "eval mode" in the header and no word of it (a new user's trial)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    note = "train audit of a model in eval mode"
    notes = nhwc_audit.audit(model.eval(), x, train=True).meta.capture_notes
    assert any(n.startswith(note) and "model.train()" in n for n in notes), notes
    assert not model.training  # (the model's mode is left as it was)
    assert not any(n.startswith(note) for n in nhwc_audit.audit(model.train(), x, train=True).meta.capture_notes)
    assert not any(n.startswith(note) for n in nhwc_audit.audit(model.eval(), x).meta.capture_notes)


def test_a_model_converted_before_the_audit_is_told_what_its_bytes_compare_with() -> None:
    """A user audits the model they converted already: the bytes are what channels_last adds over
    the model in NCHW (its baseline views the weights NCHW), where a run of the model as it is, the
    reference a user might make, is channels_last already and moves nothing: said in a note."""
    from nhwc_audit import audit
    from nhwc_audit.examples import UNet

    x = torch.randn(2, 3, 16, 16)
    plain = audit(UNet().eval(), x, bandwidth=1e9)
    converted = audit(UNet().eval().to(memory_format=torch.channels_last), x, bandwidth=1e9)
    assert converted.summary.bytes_moved == plain.summary.bytes_moved > 0
    assert [n for n in converted.meta.capture_notes if "channels_last already" in n]
    assert not [n for n in plain.meta.capture_notes if "channels_last already" in n]
