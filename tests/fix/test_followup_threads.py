"""A repair and a measurement run at the thread count the audit ran at: ``audit(threads=1)`` (the
CLI's ``--threads 1``) audited at one thread and repaired at torch's own count, and CPU kernels choose by
it (MONAI DynUNet 3D at batch 2, a training step: 7,704,928 B at one thread, 8,491,424 B at two by
eager's count; the CLI printed the one as the audit's total and the other as the repair's before)."""

from __future__ import annotations

import torch
from torch import nn

import nhwc_audit

_SEEN: list[int] = []


@torch.fx.wrap
def _threads_seen(x: torch.Tensor) -> torch.Tensor:
    _SEEN.append(torch.get_num_threads())  # called by the graph at every run, as the kernels are
    return x


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_threads_seen(self.a(x)).contiguous())  # (a revert the repair removes)


def test_the_repair_and_the_measurement_run_at_the_audits_thread_count() -> None:
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(1, 3, 16, 16)
    outside = 3 if torch.get_num_threads() != 3 else 2
    before = torch.get_num_threads()
    torch.set_num_threads(outside)
    try:
        report = nhwc_audit.audit(model, x, bandwidth=1e9, threads=1)
        assert report.meta.threads == 1 and torch.get_num_threads() == outside
        _SEEN.clear()
        repaired = report.repaired()
        assert repaired.repair is not None and repaired.repair.steps
        assert repaired.repair.bytes_before == report.summary.bytes_moved
        assert _SEEN and set(_SEEN) == {1}, _SEEN
        _SEEN.clear()
        repaired.measure(rounds=1)
        assert _SEEN and set(_SEEN) == {1}, _SEEN
        assert torch.get_num_threads() == outside
    finally:
        torch.set_num_threads(before)
