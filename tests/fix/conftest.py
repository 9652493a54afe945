"""What the repair's tests share."""

from __future__ import annotations

from typing import Any

import pytest

from nhwc_audit.fix import equivalence


@pytest.fixture
def float64_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the repair check's float64 passes: each converts its samples with ``double``
    first."""
    calls: list[int] = []
    real = equivalence.double

    def counting(v: Any) -> Any:
        calls.append(1)
        return real(v)

    monkeypatch.setattr(equivalence, "double", counting)
    return calls
