"""Audits on a CUDA device against eager CUDA, and ``--mode fake --device cuda`` predictions
against both (skipped without a GPU; ``python -m tests.cuda_check`` prints the measurements).

Each case is charged what the model's eager CUDA run adds in channels_last (:mod:`tests.eager_bytes`,
forward and backward): the op cases of the suite, the op battery of :mod:`tests.cuda_check`
between two convolutions, and small real models.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from tests.cuda_check import OPS, _battery_case
from tests.eager_bytes import eager_backward_bytes, eager_bytes
from tests.prepare.test_fake import WithGroupNorm
from tests.prepare.test_fake_cuda import RECORDED_CUDA_BYTES, TokensBackToMap
from tests.propagate import test_backward_vs_eager as back
from tests.propagate import test_op_cases_vs_eager as ops

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BANDWIDTH = 1e12

BUILDS_CPU_TENSORS = {
    "where_of_a_map_and_its_transpose_by_an_nchw_mask",  # torch.ones(...) in forward: a CPU mask
    "softmax_of_a_channel_group_masked",  # torch.zeros(...) in forward
    "column_major",  # torch.eye(8) in forward
}
"""Cases whose forward makes a tensor on the CPU: they do not run on CUDA at all."""


def _on_cuda(model: nn.Module, args: tuple[Any, ...]) -> tuple[nn.Module, tuple[Any, ...]]:
    return copy.deepcopy(model).cuda(), tuple(a.cuda() for a in args)


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    """Real and fake CUDA audits charge what eager CUDA adds."""
    expected = eager_bytes(*_on_cuda(model, (x,))).added
    for mode in ("real", "fake"):
        r = audit(model, x, device="cuda", mode=mode, bandwidth=BANDWIDTH)  # type: ignore[arg-type]
        assert r.summary.bytes_moved == expected, (mode, [(f.kind.value, f.node, f.bytes) for f in r.findings])


@pytest.mark.parametrize("case", sorted(set(ops.CASES) - BUILDS_CPU_TENSORS))
def test_an_op_case_on_cuda_is_charged_what_eager_cuda_moves(case: str) -> None:
    torch.manual_seed(0)
    _forward(ops.CASES[case]().eval(), torch.randn(2, 8, 16, 16))


@pytest.mark.parametrize("name", sorted(OPS))
def test_an_op_between_convolutions_on_cuda_is_charged_what_eager_cuda_moves(name: str) -> None:
    model, x = _battery_case(name)
    _forward(model.eval(), x)


def test_a_group_norm_after_a_batch_1_attention_on_cuda_is_charged_what_eager_cuda_moves() -> None:
    torch.manual_seed(0)
    _forward(TokensBackToMap().eval(), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("name", sorted(set(back.CASES) - BUILDS_CPU_TENSORS))
def test_backward_findings_on_cuda_charge_what_eager_cuda_adds(name: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = back.CASES[name]().train(), back._input(name)
    truth = eager_backward_bytes(*_on_cuda(model, (x,))).added
    report = audit(model, x, device="cuda", mode=mode, train=True, bandwidth=BANDWIDTH)  # type: ignore[arg-type]
    charged = sum(f.bytes for f in report.findings if f.kind.value == "backward")
    assert charged == truth, [(f.node, f.bytes, f.hint) for f in report.findings if f.kind.value == "backward"]


def test_group_norm_reverts_on_cuda_and_the_prediction_says_so() -> None:
    """GroupNorm keeps channels_last on the CPU; CUDA's kernel makes its input contiguous."""
    torch.manual_seed(0)
    model, x = WithGroupNorm().eval(), torch.randn(2, 3, 16, 16)
    for mode in ("real", "fake"):
        r = audit(model, x, device="cuda", mode=mode, bandwidth=BANDWIDTH)  # type: ignore[arg-type]
        assert [f.kind.value for f in r.findings if f.module_path == "norm"] == ["revert"], mode
    cpu = audit(model, x, device="cpu", bandwidth=BANDWIDTH)
    assert not [f for f in cpu.findings if f.module_path == "norm"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    sorted({"torchvision.resnet18", "torchvision.mobilenet_v3_small", "torchvision.convnext_tiny",
            "torchvision.shufflenet_v2_x0_5", "torchvision.efficientnet_b0", "monai.UNet2d", *RECORDED_CUDA_BYTES}),
)  # fmt: skip
def test_a_model_on_cuda_is_charged_what_eager_cuda_adds(name: str) -> None:
    from nhwc_audit.zoo.models import build

    pytest.importorskip({"smp": "segmentation_models_pytorch"}.get(name.split(".")[0], name.split(".")[0]))
    torch.manual_seed(0)
    model, args, kwargs = build(name)
    on_cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    expected = eager_bytes(*_on_cuda(model.eval(), tuple(args)), on_cuda).added
    for mode in ("real", "fake"):
        r = audit(model, tuple(args), example_kwargs=kwargs or None, device="cuda", mode=mode, bandwidth=BANDWIDTH)  # type: ignore[arg-type]
        assert r.summary.bytes_moved == expected, (mode, [(f.kind.value, f.node, f.bytes) for f in r.findings])
