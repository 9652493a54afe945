"""Every capture keys an op by the innermost line of the model's code that calls it. torch.export's
own stack traces keep the frames of ``forward`` methods only, so an op in a function forward
calls (diffusers' ``upfirdn2d_native``, timm's ``window_partition``) was keyed by the line of
the call under export, and by its own line under fx and the eager capture: a train audit (export,
for a model fx cannot trace) reported other lines than the eval audit of the same model."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from nhwc_audit import audit


def _window_partition(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.contiguous()  # a revert to NCHW: the finding's line
    return x.view(n, c, h // 2, 2, w // 2, 2)


class CallsAHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _window_partition(self.conv(x))


_HELPER_LINES = {
    inspect.getsourcelines(_window_partition)[1] + i
    for i, text in enumerate(inspect.getsourcelines(_window_partition)[0])
    if "(" in text and "def " not in text
}


def _keys(capture: str, train: bool = False) -> list[tuple[str, str, int | None, int]]:
    torch.manual_seed(0)
    r = audit(CallsAHelper().eval(), torch.randn(1, 3, 8, 8), capture=capture, bandwidth=1e9, train=train)
    return sorted(
        (f.kind.value, f.module_path, f.source.line if f.source else None, f.bytes)
        for f in r.findings
        if f.kind.value != "backward"
    )


@pytest.mark.parametrize("capture", ["export", "hooks"])
def test_an_op_in_a_helper_function_has_the_helpers_line_in_every_capture(capture: str) -> None:
    fx = _keys("fx")
    assert any(line in _HELPER_LINES for _, _, line, _ in fx), fx
    assert _keys(capture) == fx


def test_a_train_audit_through_export_keys_its_findings_as_the_eval_audit() -> None:
    assert _keys("export", train=True) == _keys("fx")
