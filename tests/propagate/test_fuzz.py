"""Fuzzing: random small CNNs; the audit never fails unexpectedly and every module output's
recorded layout equals what eager forward hooks observe on the same channels_last run."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from nhwc_audit import audit
from tests.eager import hook_layouts, report_module_layouts
from tests.fuzz_models import NETS, FuzzNet, fuzz_settings


@fuzz_settings(40)
@given(**NETS, size=st.sampled_from([4, 7, 8]))
def test_random_cnns_match_eager(ops: list[str], head: str, batch: int, size: int, train: bool) -> None:
    torch.manual_seed(0)
    model = FuzzNet(ops, head).train(train)
    x = torch.randn(batch, 3, size, size)
    report = audit(model, x, bandwidth=1e9)
    observed = hook_layouts(model, (x,), allow_error=True)
    recorded = report_module_layouts(report)
    breaks = [f for f in report.findings if f.kind.value == "break"]
    if breaks:
        # eager raised at the break: compare what it ran before raising
        assert head == "view" and [f.op for f in breaks] == ["view"]
        recorded = {k: v for k, v in recorded.items() if k in observed}
        observed = {k: v[: len(recorded[k])] for k, v in observed.items()}
    # a module that returns its input unchanged (head "none") has no node of its own
    assert set(recorded) <= set(observed)
    assert set(observed) - set(recorded) <= {"head"}
    observed = {k: v for k, v in observed.items() if k in recorded}
    assert recorded == observed
