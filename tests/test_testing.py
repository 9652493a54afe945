"""nhwc_audit.testing.assert_channels_last: for a model's own test suite."""

from __future__ import annotations

import pytest
import torch

from nhwc_audit.testing import assert_channels_last
from tests import models as M
from tests.support import BANDWIDTH


def test_a_clean_model_passes() -> None:
    assert_channels_last(M.ConvBnRelu(), torch.randn(1, 3, 8, 8), bandwidth=BANDWIDTH)


def test_offenders_are_listed_with_their_keys() -> None:
    with pytest.raises(AssertionError) as e:
        assert_channels_last(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), bandwidth=BANDWIDTH)
    text = str(e.value)
    assert text.startswith("InstanceNormNet does not stay channels_last: 2 finding(s) not allowed")
    assert "revert: norm = InstanceNorm2d in norm (InstanceNorm2d)" in text
    assert "key: revert:norm:InstanceNorm2d:models.py\n" in text and text.endswith(
        "key: conversion:conv2:Conv2d:models.py"
    )


def test_accepted_findings_are_allowed_by_module_pattern_or_key() -> None:
    x = torch.randn(1, 3, 8, 8)
    assert_channels_last(M.InstanceNormNet(), x, allow=["norm", "conv2"], bandwidth=BANDWIDTH)
    assert_channels_last(M.InstanceNormNet(), x, allow=["revert:norm:*", "conversion:*"], bandwidth=BANDWIDTH)
    assert_channels_last(M.InstanceNormNet(), x, allow=["norm"], fail_on="revert", bandwidth=BANDWIDTH)
    with pytest.raises(AssertionError, match="1 finding"):
        assert_channels_last(M.InstanceNormNet(), x, allow=["norm"], bandwidth=BANDWIDTH)


def test_finding_keys_survive_renumbered_nodes() -> None:
    """Two different graphs (an extra op in front) give the same keys for the same finding."""

    class Shifted(M.InstanceNormNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x * 1.0)

    from nhwc_audit import audit

    a = audit(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), bandwidth=BANDWIDTH)
    b = audit(Shifted(), torch.randn(1, 3, 8, 8), bandwidth=BANDWIDTH)
    assert [f.key for f in a.findings] == [f.key for f in b.findings]


def test_allow_takes_one_string_as_one_pattern() -> None:
    """``allow="norm*"`` is one pattern, not the characters n, o, r, m and a ``*`` that accepts
    everything."""
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(AssertionError, match="conv2"):
        assert_channels_last(M.InstanceNormNet(), x, allow="norm*", bandwidth=BANDWIDTH)
    assert_channels_last(M.InstanceNormNet(), x, allow="*", bandwidth=BANDWIDTH)
    with pytest.raises(TypeError, match="strings"):
        assert_channels_last(M.InstanceNormNet(), x, allow=[3], bandwidth=BANDWIDTH)  # type: ignore[list-item]


def test_a_key_written_with_its_line_still_matches_there() -> None:
    from nhwc_audit import audit

    x = torch.randn(1, 3, 8, 8)
    report = audit(M.InstanceNormNet(), x, bandwidth=BANDWIDTH)
    keys = [f"{f.key}:{f.source.line}" for f in report.findings if f.source is not None]
    assert len(keys) == len(report.findings) and all(k != f.key for k, f in zip(keys, report.findings, strict=True))
    assert_channels_last(M.InstanceNormNet(), x, allow=keys, bandwidth=BANDWIDTH)
    with pytest.raises(AssertionError):
        assert_channels_last(M.InstanceNormNet(), x, allow=[f"{k}0" for k in keys], bandwidth=BANDWIDTH)


def test_a_bad_fail_on_is_a_usage_error() -> None:
    from nhwc_audit.errors import UsageError

    with pytest.raises(UsageError, match="fail_on='reverts' is not one of"):
        assert_channels_last(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), fail_on="reverts")  # type: ignore[arg-type]
