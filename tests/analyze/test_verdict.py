"""The verdict accounts for breaks, for how much stays channels_last, and reads transposed
convolutions' weights the right way round."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nhwc_audit import AuditReport
from nhwc_audit.analyze.verdict import conv_infos, decide


class Wide(nn.Module):
    """Wide convolutions that stay channels_last: the heuristics say convert."""

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 128, 3, padding=1)
        self.b = nn.Conv2d(128, 128, 3, padding=1)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        return y.view(y.shape[0], -1) if self.head is not None else y


def test_a_model_that_breaks_is_never_plainly_convert(audit_fixed: Callable[..., AuditReport]) -> None:
    clean = audit_fixed(Wide(), torch.randn(1, 3, 8, 8))
    assert clean.verdict is not None and clean.verdict.summary == "convert"
    broken = audit_fixed(Wide(head=nn.Identity()), torch.randn(1, 3, 8, 8))
    assert broken.summary.breaks == 1
    assert broken.verdict is not None and broken.verdict.summary == "convert after fixing 1 break"
    assert any("raise on channels_last input" in r for r in broken.verdict.reasons)
    measured = decide(broken.nodes, broken.summary, device="cpu", dtype="float32", speedup=1.3)
    assert measured.summary == "convert after fixing 1 break"


def test_low_channels_last_coverage_is_a_reason_against(audit_fixed: Callable[..., AuditReport]) -> None:
    class Mostly3d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(3, 96, 3, padding=1)
            self.conv2 = nn.Conv3d(96, 96, 3, padding=1)
            self.norm = nn.InstanceNorm3d(96)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv2(self.norm(self.conv(x))))

    r = audit_fixed(Mostly3d(), torch.randn(1, 3, 4, 4, 4))
    assert r.summary.channels_last_node_share < 0.5
    assert r.verdict is not None and not r.verdict.convert
    assert any(reason.startswith("only ") and "stay channels_last" in reason for reason in r.verdict.reasons)


def test_transposed_convolutions_are_not_counted_as_grouped(audit_fixed: Callable[..., AuditReport]) -> None:
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(128, 64, 2, stride=2)
            self.grouped = nn.ConvTranspose2d(64, 64, 2, stride=2, groups=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.grouped(self.up(x))

    r = audit_fixed(Up(), torch.randn(1, 128, 4, 4))
    infos = {c.node: c for c in conv_infos(r.nodes)}
    assert (infos["up"].in_channels, infos["up"].out_channels, infos["up"].groups) == (128, 64, 1)
    assert infos["grouped"].groups == 4
    assert r.verdict is not None
    assert [reason for reason in r.verdict.reasons if "grouped" in reason] == [
        "1 grouped, non-depthwise convolution (slower in channels_last per inductor)"
    ]


def test_a_measured_gain_that_needs_the_repair_says_so(audit_fixed: Callable[..., AuditReport]) -> None:
    r = audit_fixed(Wide(), torch.randn(1, 3, 8, 8))
    v = decide(r.nodes, r.summary, device="cpu", dtype="float32", speedup=1.2, needs_repair=True)
    assert v.convert and v.summary == "convert with the repair (--apply)"
    assert "the repaired channels_last model runs 1.20x" in v.reasons[-1]
    plain = decide(r.nodes, r.summary, device="cpu", dtype="float32", speedup=1.2)
    assert plain.summary == "convert"


def test_convolutions_of_a_weight_computed_in_forward_are_counted(audit_fixed: Callable[..., AuditReport]) -> None:
    """timm's NFNets standardise every conv weight in forward (StdConv2d): no conv had a weight
    that is a parameter, and the verdict said "no convolutions: channels_last has nothing to
    speed up" of a network of 29; repaired, it says convert."""
    from tests.analyze.test_computed_weights import StdConv

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 96, 3, padding=1), StdConv(96, 96, 3, padding=1), nn.ReLU(), StdConv(96, 96, 3, padding=1)
    ).eval()
    report = audit_fixed(model, torch.randn(2, 3, 8, 8))
    assert len(conv_infos(report.nodes)) == 3
    assert not any("no convolutions" in r for r in report.verdict.reasons)
    assert report.repaired().verdict.convert


def test_a_measured_gain_some_round_does_not_show_is_noise(audit_fixed: Callable[..., AuditReport]) -> None:
    """Rounds interleave the variants; a median gain that one round's pair does not show is the machine's
    noise: three runs of `--measure` on one small model said "don't convert" (1.05x), "convert" (1.23x)
    and "don't convert" (1.00x), the rounds' spread far wider than the gain."""
    from nhwc_audit.timing.measure import Measurement, Timing

    r = audit_fixed(Wide(), torch.randn(1, 3, 8, 8))

    def timed(nchw: list[float], cl: list[float]) -> Measurement:
        def t(name: str, v: list[float]) -> Timing:
            return Timing(name, sorted(v)[len(v) // 2], min(v), max(v), len(v), tuple(v))

        return Measurement(train=False, device="cpu", timings=(t("nchw", nchw), t("channels_last", cl)))

    noisy = timed([1.3, 1.2, 2.2, 1.25, 1.3], [1.0, 1.0, 2.4, 1.0, 1.1])
    assert noisy.speedup("channels_last") == 1.3
    assert min(noisy.round_speedups("channels_last")) < 1
    v = decide(
        r.nodes, r.summary, device="cpu", dtype="float32", speedup=1.25, rounds=noisy.round_speedups("channels_last")
    )
    assert not v.convert and v.summary == "don't convert"
    assert "0.92x-1.30x round by round: within this machine's noise" in v.reasons[-1]
    steady = timed([1.3, 1.2, 2.2, 1.25, 1.3], [1.0, 1.0, 2.0, 1.0, 1.1])
    v = decide(
        r.nodes, r.summary, device="cpu", dtype="float32", speedup=1.25, rounds=steady.round_speedups("channels_last")
    )
    assert v.convert and "round by round" not in v.reasons[-1]


def test_a_measurement_keeps_each_round(audit_fixed: Callable[..., AuditReport]) -> None:
    report = audit_fixed(Wide(), torch.randn(1, 3, 8, 8)).measure(rounds=3)
    m = report.measurement
    assert m is not None and all(len(t.samples) == 3 for t in m.timings)
    assert len(m.round_speedups("channels_last")) == 3
    assert [len(t["round_s"]) for t in report.to_dict()["measurement"]["timings"]] == [3, 3]
