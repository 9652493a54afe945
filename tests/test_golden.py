"""Golden JSON reports: the audit of every test model, byte for byte (``timing`` aside).

They pin the audit's behaviour across refactors (at 2 CPU threads: CPU Conv3d layouts depend on them): a change that alters any of them must say
why and regenerate them with ``python -m pytest tests/test_golden.py --update-golden``.
Absolute paths are written relative to the repository root so the files hold on any checkout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from nhwc_audit import audit
from nhwc_audit.examples import resnet_block, unet

from . import models as M

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"


def _x(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# name -> (model factory, sample factory, audit options)
CASES: dict[str, tuple[Callable[[], Any], Callable[[], Any], dict[str, Any]]] = {
    "conv_bn_relu": (M.ConvBnRelu, _x(1, 3, 8, 8), {}),
    "instance_norm": (M.InstanceNormNet, _x(1, 3, 8, 8), {}),
    "softmax_channels": (M.SoftmaxChannels, _x(1, 3, 8, 8), {}),
    "circular_pad": (M.CircularPad, _x(1, 3, 8, 8), {}),
    "contiguous_call": (M.ContiguousCall, _x(1, 3, 8, 8), {}),
    "cat_mixed": (M.CatMixed, _x(1, 3, 8, 8), {}),
    "add_order_nchw_first": (lambda: M.AddOrder(True), _x(1, 3, 8, 8), {}),
    "add_order_cl_first": (lambda: M.AddOrder(False), _x(1, 3, 8, 8), {}),
    "se_block": (M.SEBlock, _x(1, 3, 8, 8), {}),
    "view_head": (M.ViewHead, _x(1, 3, 8, 8), {}),
    "flatten_head": (M.FlattenHead, _x(1, 3, 8, 8), {}),
    "convnext_block": (M.ConvNeXtBlock, _x(1, 8, 8, 8), {}),
    "pooling_branch": (M.PoolingBranch, _x(1, 3, 8, 8), {}),
    "conv3d": (M.Conv3dNet, _x(1, 2, 8, 8, 8), {}),
    "instance_norm_train": (M.InstanceNormNet, _x(2, 3, 8, 8), {"train": True}),
    "cat_mixed_export": (M.CatMixed, _x(1, 3, 8, 8), {"capture": "export"}),
    "view_head_hooks": (M.ViewHead, _x(1, 3, 8, 8), {"capture": "hooks"}),
    "add_order_hooks": (lambda: M.AddOrder(True), _x(1, 3, 8, 8), {"capture": "hooks"}),
    "instance_norm_fake": (M.InstanceNormNet, _x(1, 3, 8, 8), {"mode": "fake"}),
    "conv3d_fake": (M.Conv3dNet, _x(1, 2, 8, 8, 8), {"mode": "fake"}),
    "cat_mixed_both": (M.CatMixed, _x(1, 3, 8, 8), {"mode": "both"}),
    "instance_norm_bf16": (M.InstanceNormNet, _x(1, 3, 8, 8), {"dtype": torch.bfloat16}),
    "resnet_block": (resnet_block, _x(1, 3, 16, 16), {}),
    "example_unet": (lambda: unet()[0], lambda: unet()[1], {}),
}


def _scrubbed(report_json: str) -> str:
    d = json.loads(report_json)
    d.pop("timing")
    text = json.dumps(d, indent=2, ensure_ascii=False) + "\n"
    return text.replace(str(ROOT) + "/", "")


@pytest.mark.parametrize("name", sorted(CASES))
def test_report_json_matches_golden(name: str, request: pytest.FixtureRequest) -> None:
    make_model, make_sample, options = CASES[name]
    torch.manual_seed(0)
    model = make_model()
    model.eval() if not options.get("train") else model.train()
    report = audit(model, make_sample(), bandwidth=1e9, threads=2, **options)
    actual = _scrubbed(report.to_json())
    path = GOLDEN / f"{name}.json"
    if request.config.getoption("--update-golden"):
        path.write_text(actual, encoding="utf-8")
    assert path.exists(), f"no golden file {path.name}: run pytest with --update-golden"
    expected = path.read_text(encoding="utf-8")
    if actual != expected:
        (path.with_suffix(".actual.json")).write_text(actual, encoding="utf-8")
    assert actual == expected, f"{name}: report differs from {path.name} (actual written beside it)"
