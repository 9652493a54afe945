"""The pytest plugin, run for real with pytest's own pytester: a failing test gets its audit's
HTML report attached; a passing one writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = """
import torch
from torch import nn


def model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 3, padding=1))


def test_fails(nhwc_audit):
    nhwc_audit.assert_channels_last(model(), torch.randn(1, 3, 8, 8), bandwidth=1e9)


def test_passes_with_allow(nhwc_audit):
    report = nhwc_audit.assert_channels_last(model(), torch.randn(1, 3, 8, 8), allow=["1", "2"], bandwidth=1e9)
    assert report.summary.findings == 2


def test_bad_fail_on_fails_before_auditing(nhwc_audit):
    import pytest
    from nhwc_audit.errors import UsageError

    with pytest.raises(UsageError, match="fail_on='reverts'"):
        nhwc_audit.assert_channels_last(model(), torch.randn(1, 3, 8, 8), fail_on="reverts")
    assert nhwc_audit.reports == []  # nothing was audited
"""


def test_a_failing_audit_attaches_its_html_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_models=TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Sequential does not stay channels_last: 2 finding(s) not allowed*",
            "*- nhwc-audit -*",
            "HTML report: *0-Sequential.html",
        ]
    )
    (path,) = [line.split("HTML report: ", 1)[1] for line in result.outlines if line.startswith("HTML report: ")]
    assert "<svg" in Path(path).read_text(encoding="utf-8")
