"""The repair of a model torch.fx cannot trace as a whole: its parts that trace, repaired each and put
back, the whole checked against the original and audited again (:mod:`nhwc_audit.fix.parts`). The
bytes the log gives after the repair are eager's for the repaired model (the ground truth)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from nhwc_audit.cli import main
from nhwc_audit.errors import ConversionError
from tests.eager_bytes import eager_bytes


class Body(nn.Module):
    """Traces: an InstanceNorm between two convolutions (the repair's GroupNorm keeps channels_last)."""

    def __init__(self, check: bool = False) -> None:
        super().__init__()
        self.check = check
        self.c1, self.norm = nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.c2, self.gain = nn.Conv2d(8, 8, 3, padding=1), 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check and x.shape[1] != 8:  # (a branch on a traced value: no trace)
            raise ValueError("8 channels")
        return self.c2(torch.relu(self.norm(self.c1(x))))


class Top(nn.Module):
    """Does not trace: forward checks its input's size, as segmentation models do."""

    def __init__(self, tied: bool = False, check: bool = False) -> None:
        super().__init__()
        self.stem, self.body, self.head = nn.Conv2d(3, 8, 3, padding=1), Body(check), nn.Conv2d(8, 8, 3, padding=1)
        if tied:
            self.head.weight = self.body.c2.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8:
            raise ValueError("the size must be a multiple of 8")
        return self.head(self.body(self.stem(x)) * self.body.gain)  # (a plain attribute of the part)


def moved_after(model: nn.Module, repaired: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    """What eager PyTorch's channels_last run of ``repaired`` moves beyond the NCHW run of ``model``
    (the repaired model is built to run channels_last: a rewrite that keeps a map channels_last copies
    in an NCHW run of it, so its own NCHW run is no baseline). Whole runs: a copy only the NCHW model
    makes is netted against the repaired model's others (a CPU ConvTranspose3d at batch 2 copies its
    output inside its NCDHW kernel, not its channels_last_3d one), which the audit, like
    :attr:`~tests.eager_bytes.EagerBytes.added`, never counts as a saving: a reference only for models
    without such a copy (a helper's 3D sweep: monai DynUNet's repair 4,194,304 B after, this -1,310,720)."""
    moved = eager_bytes(repaired, args).channels_last
    return sum(t.nbytes for t in moved) - sum(t.nbytes for t in eager_bytes(model, args).nchw)


def build_top() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return Top().eval(), (torch.randn(1, 3, 32, 32),)


class Body3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.norm, self.c2 = (
            nn.Conv3d(4, 4, 3, padding=1),
            nn.InstanceNorm3d(4, affine=True),
            nn.Conv3d(4, 4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.norm(self.c1(x))))


class Top3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.bn = nn.Conv3d(1, 4, 3, padding=1), Body3d(), nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4:
            raise ValueError("the size must be a multiple of 4")
        return self.bn(self.body(self.stem(x)))


def build_top3d() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return Top3d().eval(), (torch.randn(2, 1, 8, 8, 8),)


def test_a_model_fx_cannot_trace_is_repaired_part_by_part() -> None:
    model, (x,) = build_top()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = audit(model, x, bandwidth=1e9)
    assert report.meta.capture == "hooks"
    before = eager_bytes(model, (x,)).added
    assert report.summary.bytes_moved == before > 0
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and [(s.node, s.kind) for s in log.steps] == [("body/norm", "instancenorm->groupnorm")]
    fixed = repaired.repaired_module
    assert isinstance(fixed, Top) and isinstance(fixed.body, torch.fx.GraphModule)
    assert log.bytes_before == before and log.bytes_after == moved_after(model, fixed, (x,)) == 0
    assert log.deviation is not None and log.deviation.outputs < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(fixed(x.to(memory_format=torch.channels_last)), model(x), atol=1e-5, rtol=1e-4)
    assert "body (GraphModule)" in repaired.repaired_code and "torch.relu" in repaired.repaired_code
    assert any("cannot trace Top as a whole" in n for n in log.notes)
    # the user's model as it was
    assert isinstance(model.body.norm, nn.InstanceNorm2d)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _NormAtTheEnd(nn.Module):
    """A part that ends in an InstanceNorm: the conversion its revert causes is the model's, after it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.enc = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8:  # (no trace of the whole: repaired by parts)
            raise ValueError("size")
        return self.head(self.enc(self.stem(x)))


def test_a_repair_by_parts_says_its_steps_count_inside_their_part() -> None:
    """A step's bytes are measured inside its part; the conversion after the part, in the model around
    it, goes too and is in the totals only: the steps did not add up to the log's drop and said "per
    forward" as a whole-graph repair's do (monai BasicUNet: 1,142,784 against 1,947,648; a helper's
    repair sweep). The log says where its steps count, in every surface."""
    from rich.console import Console

    from nhwc_audit.report.console import render_outcome

    torch.manual_seed(0)
    model, x = _NormAtTheEnd().eval(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9).repaired()
    log = report.repair
    assert log is not None and log.by_parts and log.steps
    assert log.bytes_after == moved_after(model, report.repaired_module, (x,)) == 0
    assert sum(s.bytes_saved for s in log.steps) < log.bytes_before - log.bytes_after
    assert log.steps_per == "per forward, inside its part" and log.per == "per forward"
    console = Console(record=True, width=400)
    console.print(render_outcome(report))
    assert "per forward, inside its part)" in console.export_text()
    assert report.to_dict()["repair"]["steps_per"] == "per forward, inside its part"
    assert "per forward, inside its part" in report.to_html()


class _Pyramid(nn.Module):
    """A pyramid pooling head (smp UPerNet's PSPModule): pooled maps interpolated back and joined."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True))
            for s in (1, 2, 3, 6)
        )
        self.out = nn.Conv2d(5 * c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        maps = [x, *(F.interpolate(b(x), size=(h, w), mode="bilinear") for b in self.blocks)]
        return self.out(torch.cat(maps, dim=1))


class _HandsChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 32, 3, stride=8, padding=1), _Pyramid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)
        if bool(f.abs().sum() >= 0):  # a branch on a value: fx cannot trace the model whole
            f = f.contiguous(memory_format=torch.channels_last)  # what the NCHW model hands its head too
        return self.head(f)


def test_a_part_s_steps_are_charged_over_what_it_moves_in_the_nchw_model() -> None:
    """A part's steps count what they remove beyond what the part moves in the NCHW model, on the
    inputs the NCHW model hands it: smp UPerNet's encoder gives its pyramid head a channels_last map
    in either layout, whose mixed cat is no cost of the conversion; measured on an NCHW copy of its
    inputs, the part's repair charged it and its step read 180,224 B where the model's drop is 98,304
    (a helper's repair sweep; here 18,432 against 10,240)."""
    torch.manual_seed(0)
    model, x = _HandsChannelsLast().eval(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9)
    assert report.meta.capture == "hooks" and report.summary.bytes_moved == eager_bytes(model, (x,)).added > 0
    log = report.repaired().repair
    assert log is not None and log.by_parts and log.bytes_after == 0
    assert [s.node for s in log.steps] == ["head/interpolate"]
    assert sum(s.bytes_saved for s in log.steps) == log.bytes_before - log.bytes_after


class _TakesAList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, y: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(y, (list, tuple)):  # a branch fx's trace takes the other way
            y = y[0] + y[1]
        return self.c2(self.c1(y).contiguous())


class _HandsAList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.part = nn.Conv2d(3, 8, 3, padding=1), _TakesAList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c0(x)
        if bool(y.abs().sum() >= 0):  # a branch on a value: fx cannot trace the model whole
            y = y * 1
        return self.part([y, y.clone()])


def test_a_part_whose_trace_runs_otherwise_is_refused_with_the_repair_s_reason() -> None:
    """A part's repair starts from its own fx audit; where that audit refuses the trace, the repair
    traces the part itself and says why as a repair does (a review: the log gave the audit's advice,
    to audit with capture 'auto' or 'hooks', which means nothing for a repair)."""
    torch.manual_seed(0)
    model, x = _HandsAList().eval(), torch.randn(1, 3, 16, 16)
    log = audit(model, x, bandwidth=1e9).repaired().repair
    assert log is not None and not log.changed
    (why,) = [r for r in log.refused if r.startswith("part part: ")]
    assert "the trace took a branch of forward the other way" in why and "capture" not in why, why


def test_a_part_that_shares_a_weight_with_the_rest_is_left_as_it_is() -> None:
    torch.manual_seed(0)
    model, x = Top(tied=True).eval(), torch.randn(1, 3, 32, 32)
    log = audit(model, x, bandwidth=1e9).repaired().repair
    assert log is not None and not log.changed
    assert any(r.startswith("part body: shares a parameter") for r in log.refused), log.refused


def test_a_part_that_does_not_trace_is_named_in_the_log() -> None:
    torch.manual_seed(0)
    model, x = Top(check=True).eval(), torch.randn(1, 3, 32, 32)
    log = audit(model, x, bandwidth=1e9).repaired().repair
    assert log is not None and not log.changed
    assert any(r.startswith("part body: ") and "could not trace Body" in r for r in log.refused), log.refused


def test_a_model_fx_cannot_trace_with_nothing_to_repair_is_handed_back_as_converted() -> None:
    class Clean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] % 8:
                raise ValueError("the size must be a multiple of 8")
            return self.body(x)

    report = audit(Clean().eval(), torch.randn(1, 3, 16, 16), bandwidth=1e9)
    assert report.meta.capture == "hooks" and not report.findings
    log = report.repaired().repair
    assert log is not None and not log.changed and log.bytes_after == 0


class Encoder(Body):
    @property
    def width(self) -> int:  # what the parent reads of it otherwise than by calling it
        return self.c2.out_channels


class TwoParts(nn.Module):
    def __init__(self, hooked: bool = False) -> None:
        super().__init__()
        self.stem, self.enc, self.body = nn.Conv2d(3, 8, 3, padding=1), Encoder(), Body()
        if hooked:
            self.body.register_forward_hook(lambda m, a, o: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8:
            raise ValueError("the size must be a multiple of 8")
        return self.body(self.enc(self.stem(x))) * (self.enc.width / 8)


def test_a_part_the_model_cannot_use_repaired_sinks_no_other() -> None:
    torch.manual_seed(0)
    model, x = TwoParts().eval(), torch.randn(1, 3, 32, 32)
    report = audit(model, x, bandwidth=1e9)
    log = report.repaired().repair
    assert log is not None and [s.node for s in log.steps] == ["body/norm"]
    assert any(r.startswith("part enc: repaired, ") and "width" in r for r in log.refused), log.refused
    assert log.bytes_after < log.bytes_before


def test_a_part_with_hooks_of_its_own_is_left_as_it_is() -> None:
    torch.manual_seed(0)
    model, x = TwoParts(hooked=True).eval(), torch.randn(1, 3, 32, 32)
    log = audit(model, x, bandwidth=1e9).repaired().repair
    assert log is not None and "body/norm" not in [s.node for s in log.steps]
    assert any(r.startswith("part body: has forward hooks") for r in log.refused), log.refused


@pytest.mark.parametrize("build", ["build_top", "build_top3d"])
def test_the_saved_parts_go_back_into_the_model_in_a_fresh_process(
    build: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``apply(model)`` puts each part into the user's model with that model's own weights (trained since
    the repair: here other ones) and training modes, and converts a 3D model's tensors to channels_last_3d."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"user_{build}.py").write_text(f"from tests.fix.test_parts import {build}\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main([f"user_{build}:{build}", "--apply", "--save-repaired", "rep", "--no-report", "--quiet"]) == 0
    assert (tmp_path / "rep" / "__init__.py").is_file() and (tmp_path / "rep" / "part_body" / "module.py").is_file()
    script = textwrap.dedent(
        f"""
        import copy, torch, rep
        from tests.fix.test_parts import {build} as build
        model, (x,) = build()
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():  # the user's weights, trained since the repair
                p.add_(torch.randn_like(p) * 0.1)
        model.train()
        fixed = rep.apply(copy.deepcopy(model))
        assert type(fixed.body).__name__ == "Repaired", type(fixed.body)
        assert all(m.training for m in fixed.modules())
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        torch.testing.assert_close(fixed(x.to(memory_format=fmt)), model(x), atol=1e-4, rtol=1e-3)
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])},
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["monai.BasicUNet2d", "ultralytics.yolo11n"])
def test_public_models_fx_cannot_trace_are_repaired_part_by_part(name: str) -> None:
    """monai's BasicUNet (its InstanceNorms, in parts that trace); ultralytics' YOLO11n, whose layers
    its model's forward routes by an attribute of each (``m.f``), kept on the repaired part."""
    from nhwc_audit.zoo.models import build

    model, args, _ = build(name)
    report = audit(model, *args, bandwidth=1e9)
    assert report.meta.capture == "hooks"
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and log.changed and log.bytes_before == eager_bytes(model, args).added > 0
    assert log.bytes_after == moved_after(model, repaired.repaired_module, args) < log.bytes_before


def test_parts_that_move_no_fewer_bytes_in_the_model_are_not_kept() -> None:
    """Each part is repaired on channels_last inputs; where the model hands a part NCHW ones (a revert
    upstream), the whole audited again may move no fewer bytes: the model is then handed back as converted,
    and the log says why."""
    import dataclasses

    from nhwc_audit.fix.parts import repair_parts
    from nhwc_audit.fix.repair import repair_model, repair_samples

    model, args = build_top()
    report = audit(model, args[0], bandwidth=1e9)

    def worse(m: nn.Module) -> tuple[tuple[object, ...], object]:  # as if the parts moved a byte more
        return report.nodes, dataclasses.replace(report.summary, bytes_moved=report.summary.bytes_moved + 1)

    fixed, log = repair_parts(
        model,
        repair_samples(model, args, {}),
        report.findings,
        whole_error=ConversionError("no trace"),
        repair=lambda part, sample, _built: repair_model(part, *sample, bandwidth=1e9),
        reaudit=worse,  # type: ignore[arg-type]
        before=(report.nodes, report.summary),
        grads=True,
    )
    assert not log.changed and log.bytes_after == log.bytes_before
    assert any("the model moves" in r for r in log.refused), log.refused
    assert isinstance(fixed.body.norm, nn.InstanceNorm2d)


class BreaksAtTheTop(Top):
    """Its top forward views a map, which raises on channels_last: the run that records the parts' inputs
    stopped there with a raw RuntimeError, and the repair with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8:
            raise ValueError("the size must be a multiple of 8")
        y = self.head(self.body(self.stem(x)))
        return y.view(y.shape[0], -1)


def test_a_model_that_breaks_in_its_top_forward_is_refused_by_the_check_not_the_recording() -> None:
    torch.manual_seed(0)
    model, x = BreaksAtTheTop().eval(), torch.randn(1, 3, 32, 32)
    report = audit(model, x, bandwidth=1e9)
    assert report.summary.breaks == 1
    log = report.repaired().repair
    assert log is not None and not log.changed
    assert any(r.startswith("part body: repaired, it fails to run in the model") for r in log.refused), log.refused


def test_a_repair_that_kept_nothing_says_whether_it_refused_or_had_nothing_to_try() -> None:
    """The console and the report said "nothing to repair: no rewrite removes bytes without changing
    the math" whenever nothing was kept, also where a part's repair was refused for failing to run
    in the model (the refusal printed under it)."""
    from rich.console import Console

    from nhwc_audit.report.console import render_outcome

    torch.manual_seed(0)
    refused = audit(BreaksAtTheTop().eval(), torch.randn(1, 3, 32, 32), bandwidth=1e9).repaired()
    nothing = audit(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 8, 8), bandwidth=1e9).repaired()
    for report, words in ((refused, "no rewrite kept: 1 tried, each refused"), (nothing, "nothing to repair:")):
        console = Console(record=True, width=400)
        console.print(render_outcome(report))
        text = console.export_text()
        assert words in text and "without changing the math" not in text, text
        assert words in report.to_html() and report.to_dict()["repair"]["unchanged"].startswith(words)


class IteratingHead(nn.Module):
    """Its forward iterates over a list of maps (Segformer's head does): it does not trace either."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(8, 8, 1) for _ in range(2)])
        self.norm = nn.InstanceNorm2d(8, affine=True)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return sum(self.norm(c(m)) for m, c in zip(maps, self.convs, strict=True))  # type: ignore[return-value]


class ChecksThenIterates(nn.Module):
    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), IteratingHead()
        if not norm:
            self.head.norm = nn.Identity()  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8:
            raise ValueError("the size must be a multiple of 8")
        y = self.stem(x)
        return self.head([y, y * 2])


@pytest.mark.parametrize("norm", [True, False], ids=["untraced-part", "nothing-found"])
def test_the_log_says_no_part_was_repaired_when_none_traced(norm: bool) -> None:
    """The note read "its parts that trace were repaired each ..." also where no part traced (diffusers'
    UNet2DModel, Segformer) or nothing was found (transformers' ConvNext), and each untraced part's
    reason repeated torch.fx's pointer to its docs ("This can be attempted when ... See the torch.fx
    docs on pytorch.org ..."), three times over for diffusers' UNet2DModel."""
    torch.manual_seed(0)
    report = audit(ChecksThenIterates(norm).eval(), torch.randn(1, 3, 32, 32), bandwidth=1e9)
    assert report.meta.capture == "hooks"
    log = report.repaired().repair
    assert log is not None and not log.changed
    assert not any("were repaired" in n for n in log.notes), log.notes
    if norm:
        assert report.summary.bytes_moved > 0
        assert any("nor any part of it with a finding" in n for n in log.notes), log.notes
        (why,) = log.refused
        assert why.startswith("part head: ") and "Proxy object cannot be iterated (forward iterates" in why, why
        assert "torch.fx docs" not in why and "This can be attempted" not in why
    else:
        assert report.summary.bytes_moved == 0 and not log.refused
        assert any("nothing to repair" in n for n in log.notes), log.notes
