"""pytest plugin (registered through the ``pytest11`` entry point): the ``nhwc_audit`` fixture
audits models inside a test, and when the test fails, the HTML report of each audit is written
and its path added to the test's output.

    def test_unet_stays_channels_last(nhwc_audit):
        nhwc_audit.assert_channels_last(build_unet(), torch.randn(2, 3, 128, 128), allow=["head.*"])

Importing this module costs nothing: torch and the audit load when the fixture is first used.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .records import FailOn
    from .result import AuditReport

__all__ = ["AuditFixture"]

_KEY = pytest.StashKey["AuditFixture"]()


class AuditFixture:
    """What the ``nhwc_audit`` fixture hands a test: ``audit`` and ``assert_channels_last`` that
    remember their reports, to be written out if the test fails."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.reports: list[AuditReport] = []

    def audit(self, model: Any, example_inputs: Any = None, **options: Any) -> AuditReport:
        """:func:`nhwc_audit.audit`, remembered for the failure report."""
        from .api import audit

        report = audit(model, example_inputs, **options)
        self.reports.append(report)
        return report

    def assert_channels_last(
        self,
        model: Any,
        example_inputs: Any = None,
        *,
        allow: Iterable[str] | str = (),
        fail_on: FailOn = "any",
        **options: Any,
    ) -> AuditReport:
        """:func:`nhwc_audit.testing.assert_channels_last` on a remembered audit; returns it."""
        __tracebackhide__ = True
        from .testing import check_report, checked_arguments

        checked_arguments(allow, fail_on)  # bad arguments fail before the audit runs
        report = self.audit(model, example_inputs, **options)
        check_report(report, allow=allow, fail_on=fail_on)
        return report

    def write(self) -> list[Path]:
        """The HTML report of every audit so far, written into the fixture's folder."""
        paths = []
        for i, report in enumerate(self.reports):
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", report.meta.model) or "model"
            paths.append(report.save_html(self.folder / f"{i}-{name}.html"))
        return paths


@pytest.fixture
def nhwc_audit(request: pytest.FixtureRequest, tmp_path: Path) -> Generator[AuditFixture, None, None]:
    """Audit models in a test; their HTML reports are attached to the output when it fails."""
    fixture = AuditFixture(tmp_path)
    request.node.stash[_KEY] = fixture
    yield fixture


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    fixture = item.stash.get(_KEY, None)
    if fixture is not None and report.when == "call" and report.failed and fixture.reports:
        paths = fixture.write()
        report.sections.append(("nhwc-audit", "\n".join(f"HTML report: {p}" for p in paths)))
    return report
