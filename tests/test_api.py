"""The Python API: audit/check/incompatible_nodes/convert, the report object, JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nhwc_audit
from nhwc_audit import AuditReport, ChannelsLastError, NhwcAuditError, audit, check, convert, incompatible_nodes
from nhwc_audit.examples import UNet, unet
from nhwc_audit.report.text import fmt_bytes
from tests import models as M
from tests.support import BANDWIDTH


def _state(model: nn.Module) -> dict[str, tuple[torch.Tensor, tuple[int, ...], torch.dtype, torch.device]]:
    return {
        name: (t.detach().clone(), tuple(t.stride()), t.dtype, t.device)
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
    }


def _assert_same_state(model: nn.Module, before: dict) -> None:  # type: ignore[type-arg]
    after = _state(model)
    assert after.keys() == before.keys()
    for name, (value, stride, dtype, device) in before.items():
        v2, s2, d2, dev2 = after[name]
        assert (s2, d2, dev2) == (stride, dtype, device), name
        assert torch.equal(v2, value), name


@pytest.mark.parametrize("train", [True, False])
def test_audit_never_touches_the_model_or_the_sample(train: bool, audit_fixed: Callable[..., AuditReport]) -> None:
    model = UNet(width=4).train(train)
    before = _state(model)
    hooks = (dict(model._forward_hooks), dict(model._forward_pre_hooks))
    x = torch.randn(1, 3, 32, 32)
    x_before = (x.clone(), x.stride())
    report = audit_fixed(model, x)
    check(model, x, fail_on="never", bandwidth=BANDWIDTH)
    _assert_same_state(model, before)  # BatchNorm running stats included
    assert model.training is train
    assert all(m.training is train for m in model.modules())
    assert (dict(model._forward_hooks), dict(model._forward_pre_hooks)) == hooks
    assert torch.equal(x, x_before[0]) and x.stride() == x_before[1]
    assert report.meta.training is train


def test_inplace_model_does_not_write_into_the_sample(audit_fixed: Callable[..., AuditReport]) -> None:
    class Inplace(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mul_(2).relu_()

    x = torch.randn(1, 3, 4, 4).to(memory_format=torch.channels_last)
    before = x.clone()
    audit_fixed(Inplace(), x)
    assert torch.equal(x, before)


def test_build_fn_and_tuple_forms(audit_fixed: Callable[..., AuditReport]) -> None:
    r1 = audit_fixed(unet)  # build_fn returning (module, (input,))
    assert r1.meta.inputs[0].shape == (1, 3, 128, 128)
    r2 = audit(lambda: (M.InstanceNormNet(), torch.randn(1, 3, 8, 8)), bandwidth=BANDWIDTH)
    assert [f.node for f in r2.findings] == ["norm", "conv2"]


def test_a_build_fn_returning_a_tuple_without_a_module_first_says_which_item() -> None:
    """It said "returned tuple, not an nn.Module" of ("not a module", x) (a new user's trial)."""
    from nhwc_audit.errors import TargetLoadError

    with pytest.raises(TargetLoadError, match="returned a tuple whose first item is a str, not an nn.Module"):
        audit(lambda: ("resnet", torch.randn(1, 3, 8, 8)), bandwidth=BANDWIDTH)
    with pytest.raises(TargetLoadError, match=r"returned str, not an nn.Module"):
        audit(lambda: "resnet", bandwidth=BANDWIDTH)


def test_kwargs_and_non_image_inputs_pass_through() -> None:
    class Cond(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.emb = nn.Linear(1, 4)

        def forward(self, x: torch.Tensor, t: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return self.conv(x) * scale + self.emb(t)[:, :, None, None]

    r = audit(Cond(), (torch.randn(2, 3, 8, 8), torch.randn(2, 1)), example_kwargs={"scale": 2.0}, bandwidth=BANDWIDTH)
    assert [t.layout.value for t in r.meta.inputs] == ["channels_last", "not_spatial"]
    assert r.findings == ()


def test_keyword_tensors_are_named_in_the_report_inputs() -> None:
    class Cond(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.emb = nn.Linear(1, 4)

        def forward(self, x: torch.Tensor, t: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
            y = self.conv(x) + self.emb(t)[:, :, None, None]
            return y * masks[0] * masks[1] if masks else y

    kwargs = {"t": torch.randn(2, 1), "masks": [torch.ones(2, 1, 8, 8), torch.ones(2, 1, 8, 8)]}
    r = audit(Cond(), torch.randn(2, 3, 8, 8), example_kwargs=kwargs, bandwidth=BANDWIDTH)
    assert [(k, t.shape) for k, t in r.meta.keyword_inputs] == [
        ("t", (2, 1)),
        ("masks[0]", (2, 1, 8, 8)),
        ("masks[1]", (2, 1, 8, 8)),
    ]
    assert "input 2x3x8x8, t=2x1, masks[0]=2x1x8x8, masks[1]=2x1x8x8," in str(r).splitlines()[0]
    assert [i["name"] for i in r.to_dict()["keyword_inputs"]] == ["t", "masks[0]", "masks[1]"]
    assert "input 2x3x8x8, t=2x1, masks[0]=2x1x8x8" in r.to_html()


def test_incompatible_nodes_are_records_in_graph_order() -> None:
    nodes = incompatible_nodes(M.ViewHead(), torch.randn(1, 3, 8, 8), bandwidth=BANDWIDTH)
    assert [(n.name, n.op_name) for n in nodes] == [("view", "view"), ("norm", "InstanceNorm2d")]
    assert nodes[0].index < nodes[1].index


def test_check_passes_clean_models_and_lists_offenders() -> None:
    report = check(M.ConvBnRelu(), torch.randn(1, 3, 8, 8), bandwidth=BANDWIDTH)
    assert report.summary.findings == 0
    with pytest.raises(ChannelsLastError) as exc:
        check(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), bandwidth=BANDWIDTH)
    err = exc.value
    assert isinstance(err, NhwcAuditError)
    lines = str(err).splitlines()
    assert "2 offending node(s)" in lines[0]
    assert "revert: norm = InstanceNorm2d in norm (InstanceNorm2d) at" in lines[1]
    assert "models.py:" in lines[1] and "GroupNorm" in lines[1]
    assert lines[2].lstrip().startswith("2. conversion: conv2")
    assert [f.node for f in err.offenders] == ["norm", "conv2"]  # type: ignore[attr-defined]
    assert "with the conversions" not in lines[0]
    # 'revert' ignores conversions alone; the revert is still there, and the message says what its
    # change removes in all (it said the revert's bytes alone: half of the fix's, on a new user's trial)
    with pytest.raises(ChannelsLastError) as exc:
        check(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), fail_on="revert", bandwidth=BANDWIDTH)
    (fix,) = audit(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), bandwidth=BANDWIDTH).fixes
    head = str(exc.value).splitlines()[0]
    assert "1 offending node(s), " in head and head.endswith(
        f"({fmt_bytes(fix.bytes)} with the conversions and mixed ops they cause)"
    )
    with pytest.raises(nhwc_audit.UsageError):
        check(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), fail_on="sometimes", bandwidth=BANDWIDTH)


def test_a_numpy_bandwidth_is_a_number() -> None:
    np = pytest.importorskip("numpy")
    r = nhwc_audit.audit(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), bandwidth=np.float32(1e9))
    assert r.meta.bandwidth == 1e9


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "meta"}, "device 'meta' is not a device to audit on"),
        ({"device": "meta", "mode": "fake"}, "device 'meta' is not a device to audit on"),
        ({"dtype": "float64"}, "dtype must be a floating torch.dtype"),
        ({"dtype": torch.int8}, "dtype must be a floating torch.dtype"),
        ({"bandwidth": "fast"}, "bandwidth must be a positive, finite number of bytes/s"),
        ({"bandwidth": True}, "bandwidth must be a positive, finite number of bytes/s"),
        ({"bandwidth": float("nan")}, "bandwidth must be a positive, finite number of bytes/s"),
        ({"bandwidth": -1.0}, "bandwidth must be a positive, finite number of bytes/s"),
    ],
)
def test_bad_options_are_usage_errors_before_anything_runs(options: dict[str, object], message: str) -> None:
    with pytest.raises(nhwc_audit.UsageError, match=message):
        nhwc_audit.audit(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), **options)  # type: ignore[arg-type]


def test_convert_returns_independent_channels_last_copy_including_3d() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    conv3 = M.Conv3dNet()
    for m in (model, conv3):
        before = _state(m)
        c = convert(m)
        _assert_same_state(m, before)
        for (name, p), (_, q) in zip(m.named_parameters(), c.named_parameters(), strict=True):
            assert torch.equal(p, q), name
            assert p.data_ptr() != q.data_ptr()
            if p.dim() == 4:
                assert q.stride() == p.to(memory_format=torch.channels_last).stride()
            if p.dim() == 5:
                assert q.is_contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(RuntimeError):  # why convert() exists: torch's own call rejects 5D weights
        M.Conv3dNet().to(memory_format=torch.channels_last)


def test_report_json_is_schema_valid_deterministic_and_saved(tmp_path: Path) -> None:
    schema = json.loads(resources.files("nhwc_audit.report").joinpath("schema.json").read_text())
    r1 = audit(unet, bandwidth=2e9)
    r2 = audit(unet, bandwidth=2e9)
    d1, d2 = r1.to_dict(), r2.to_dict()
    jsonschema.validate(d1, schema)
    jsonschema.validate({k: v for k, v in d1.items() if k != "keyword_inputs"}, schema)  # a report from before it
    d1.pop("timing"), d2.pop("timing")
    assert json.dumps(d1) == json.dumps(d2)
    assert list(d1)[:4] == ["schema", "model", "torch_version", "capture"]
    path = r1.save_json(tmp_path / "r.json")
    text = path.read_text()
    loaded = json.loads(text)
    assert loaded == json.loads(r1.to_json(indent=None)) == json.loads(r1.to_json(indent=4))
    assert loaded["schema"] == "nhwc-audit/1"
    # one node per line, so that two reports diff node by node
    lines = text.splitlines()
    for node in loaded["nodes"]:
        assert sum(f'"name": {json.dumps(node["name"])},' in line for line in lines) == 1
    assert [f["node"] for f in loaded["findings"]] == [f.node for f in r1.findings]
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_json_makes_its_folder_and_a_file_in_the_way_is_a_clear_error(
    tmp_path: Path, audit_fixed: Callable[..., AuditReport]
) -> None:
    r = audit_fixed(M.ConvBnRelu(), torch.randn(1, 3, 8, 8))
    assert r.save_json(tmp_path / "reports" / "unet.json").is_file()  # the README's example, on a fresh folder
    assert r.save_html(tmp_path / "html" / "unet.html").is_file()
    (tmp_path / "afile").write_text("")
    with pytest.raises(nhwc_audit.ReportWriteError, match="cannot write"):
        r.save_json(tmp_path / "afile" / "r.json")


def test_repr_html_escapes_and_lists_findings(audit_fixed: Callable[..., AuditReport]) -> None:
    r = audit_fixed(M.InstanceNormNet(), torch.randn(1, 3, 8, 8))
    html = r._repr_html_()
    assert "InstanceNorm2d" in html and "<table" in html
    assert "norm" in str(r)


def test_model_error_is_reported_as_the_models_own(audit_fixed: Callable[..., AuditReport]) -> None:
    with pytest.raises(nhwc_audit.PropagationError) as exc:
        audit_fixed(M.InstanceNormNet(), torch.randn(1, 5, 8, 8))
    msg = str(exc.value)
    assert "node 'conv'" in msg and "not a channels_last problem" in msg and "node inputs 1x5x8x8" in msg
    assert exc.value.node == "conv"


def test_untraceable_model_falls_back_and_says_why(audit_fixed: Callable[..., AuditReport]) -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(nhwc_audit.TraceError, match="torch.fx could not trace DataDependent"):
        audit_fixed(DataDependent(), torch.randn(1, 3, 4, 4), capture="fx")
    report = audit_fixed(DataDependent(), torch.randn(1, 3, 4, 4))
    assert report.meta.capture == "hooks"
    assert [n.split(":")[0] for n in report.meta.capture_notes] == ["fx", "hooks"]
    assert "torch.fx could not trace DataDependent" in report.meta.capture_notes[0]
    assert "torch.export is tried only when a graph is needed" in report.meta.capture_notes[1]
    # the line that branches is named; a repair (which needs the graph) is not told to capture otherwise
    line = f"{__file__}:{test_untraceable_model_falls_back_and_says_why.__code__.co_firstlineno + 3} (if x.sum() > 0:)"
    assert f"DataDependent at {line}: TraceError" in report.meta.capture_notes[0]
    _, log = nhwc_audit.repair(DataDependent(), torch.randn(1, 3, 4, 4))  # nothing to repair
    assert not log.changed

    class Branching(nn.Module):  # a finding in the top forward, which no part of it can hold
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.instance_norm(self.conv(x))
            return y if y.sum() > 0 else -y

    with pytest.raises(nhwc_audit.ConversionError) as refused:
        nhwc_audit.repair(Branching(), torch.randn(1, 3, 4, 4))
    branch = f"{__file__}:{Branching.forward.__code__.co_firstlineno + 2} (return y if y.sum() > 0 else -y)"
    assert branch in str(refused.value) and "torch.fx.wrap" in str(refused.value)
    assert "capture" not in str(refused.value), str(refused.value)
    trained = audit_fixed(DataDependent(), torch.randn(1, 3, 4, 4), train=True)  # backward needs a graph
    assert [n.split(":")[0] for n in trained.meta.capture_notes][:2] == ["fx", "export"]
    hooked = audit_fixed(DataDependent(), torch.randn(1, 3, 4, 4), train=True, capture="hooks")
    assert not hooked.meta.backward  # asked for, not run: the headline says so, not "0 backward"
    assert "backward not audited" in str(hooked) and "0 backward" not in str(hooked)


def test_measured_bandwidth_is_labelled() -> None:
    r = audit(M.ConvBnRelu(), torch.randn(1, 3, 8, 8))
    assert r.meta.bandwidth_source == "measured" and r.meta.bandwidth > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dtype_and_autocast(dtype: torch.dtype, audit_fixed: Callable[..., AuditReport]) -> None:
    r = audit_fixed(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), dtype=dtype)
    assert r.meta.dtype == str(dtype).removeprefix("torch.")
    assert [(f.node, f.kind.value) for f in r.findings] == [("norm", "revert"), ("conv2", "conversion")]
    assert r.findings[0].bytes == 2 * 8 * 8 * 8 * 2  # 2-byte elements
    model = M.InstanceNormNet()
    r = audit_fixed(model, torch.randn(1, 3, 8, 8), autocast=True)
    assert r.meta.autocast == "bfloat16" and "autocast bfloat16" in r.headline
    conv = next(n for n in r.nodes if n.name == "conv")
    assert conv.outputs[0].dtype == "bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters())


class Sneaky(nn.Module):
    """isinstance(Proxy, Tensor) is False while fx traces: the graph takes the other branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv(x)
        if isinstance(y, torch.Tensor):
            return y * 2
        return y


@pytest.mark.parametrize("batch", [1, 4])
def test_fx_graph_that_differs_from_eager_falls_back(batch: int, audit_fixed: Callable[..., AuditReport]) -> None:
    r = audit_fixed(Sneaky(), torch.randn(batch, 3, 8, 8))
    assert r.meta.capture == "hooks"
    assert r.meta.capture_notes[0].startswith("fx: the captured graph does not reproduce eager")
    ok = audit_fixed(M.ConvBnRelu(), torch.randn(batch, 3, 8, 8))
    assert ok.meta.capture == "fx" and ok.meta.capture_notes == ()


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_source_lines_are_the_models_never_the_callers(capture: str, audit_fixed: Callable[..., AuditReport]) -> None:
    """A torch.nn-only model has no source line of its own; the line that called audit() is
    not the model's and must not be reported (fx and hooks captures share one frame walker)."""
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4))
    r = audit_fixed(plain, torch.randn(1, 3, 8, 8), capture=capture)
    assert r.findings and all(f.source is None for f in r.findings)
    r = audit_fixed(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), capture=capture)
    assert all(f.source is not None and f.source.file.endswith("models.py") for f in r.findings)


def test_threads_are_recorded_and_decide_cpu_conv3d_layouts(audit_fixed: Callable[..., AuditReport]) -> None:
    """CPU Conv3d(8 -> 2, k=1) at 64^3 keeps channels_last_3d with 2 threads, NCDHW with 1."""
    conv = nn.Conv3d(8, 2, 1)
    x = torch.randn(1, 8, 64, 64, 64)
    before = torch.get_num_threads()
    layouts = {}
    for threads in (1, 2):
        r = audit_fixed(conv, x, threads=threads)
        assert r.meta.threads == threads and f"{threads} thread" in r.headline
        assert json.loads(r.to_json())["threads"] == threads
        layouts[threads] = next(
            n.output_layout.value for n in r.nodes if n.op not in ("placeholder", "get_attr", "output")
        )
    assert layouts == {1: "contiguous", 2: "channels_last"}
    assert torch.get_num_threads() == before  # put back
    with pytest.raises(NhwcAuditError, match="threads must be at least 1"):
        audit_fixed(conv, x, threads=0)


def test_inputs_in_a_list_are_recorded() -> None:
    """Detection models take a list of images: the report's inputs name them."""

    class ListInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
            return self.conv(torch.stack(images))

    r = audit(ListInput(), ([torch.randn(3, 8, 8), torch.randn(3, 8, 8)],), bandwidth=1e9)
    assert [t.shape for t in r.meta.inputs] == [(3, 8, 8), (3, 8, 8)]


def test_the_default_input_follows_the_first_convolution() -> None:
    r = audit(nn.Sequential(nn.Conv3d(2, 4, 3), nn.InstanceNorm3d(4)), bandwidth=1e9)
    assert [t.shape for t in r.meta.inputs] == [(1, 2, 16, 112, 112)]  # a batched clip, not an unbatched volume
    r = audit(nn.Sequential(nn.Conv2d(1, 4, 3)), bandwidth=1e9)
    assert [t.shape for t in r.meta.inputs] == [(1, 1, 224, 224)]


def test_audit_leaves_every_random_generator_as_it_was() -> None:
    """The audit seeds the generators its runs draw from, inside a fork; seeding them with
    ``torch.manual_seed`` also queued a CUDA, XPU and MTIA seed per run on a machine where
    those are not initialised (applied, in place of the user's own seed, when the device
    starts) and reseeded an initialised CUDA generator that a CPU audit never restored; the
    repair's measurements drew from the user's generator."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.drop = nn.Dropout2d(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.conv(x)).softmax(1) + torch.rand_like(x[:, :1, 1:-1, 1:-1])

    trackers = [getattr(torch, b)._lazy_seed_tracker for b in ("cuda", "xpu", "mtia") if hasattr(torch, b)]
    queued = [t.get_calls() for t in trackers]
    model, x = Noisy().train(), torch.randn(2, 3, 8, 8)
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    report = audit(model, x, train=True, bandwidth=BANDWIDTH)
    report.repaired()
    assert torch.equal(torch.random.get_rng_state(), cpu)
    assert [t.get_calls() for t in trackers] == queued
    if cuda is not None:
        assert all(map(torch.equal, torch.cuda.get_rng_state_all(), cuda))


class _KeepPositive(nn.Module):
    """Shapes that depend on values, as a detector's box filtering makes them: the positions of
    channel 0 above zero, gathered from every channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[:, :, y[0, 0] > 0]


_TAIL_SHAPES: list[int] = []


class _KeepPositiveThenTail(_KeepPositive):
    """_KeepPositive, then a module that notes the number of positions it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.tail = _NoteWidth()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(super().forward(x))


class _NoteWidth(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if type(y) is torch.Tensor:  # not a proxy, nor a fake tensor
            _TAIL_SHAPES.append(y.shape[-1])
        return y * 2


def test_a_run_stops_before_a_shape_made_from_permuted_values() -> None:
    """The eager recording stops at the boolean mask, before the rest of the model runs on
    shapes that are not the model's; the run on copies of the weights is the only one after it."""
    torch.manual_seed(0)
    model = _KeepPositiveThenTail().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        kept = convert(copy.deepcopy(model))(x.to(memory_format=torch.channels_last)).shape[-1]
    _TAIL_SHAPES.clear()
    r = audit(model, x, bandwidth=1e9, capture="hooks")
    assert _TAIL_SHAPES == [kept]
    assert any("shapes depend on tensor values (index)" in note for note in r.meta.capture_notes)


class _GuardedMask(nn.Module):
    """Boolean-mask indexing behind a bare ``except:``, with a fallback: the audit's stop before
    the mask must not be swallowed, leaving the fallback's shapes as the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        try:
            kept = y[:, :, y[0, 0] > 0]
        except:  # noqa: E722 (as some model code has)
            kept = y.flatten(2)
        return self.head(y), kept


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_a_bare_except_does_not_hide_shapes_made_from_values(capture: str) -> None:
    torch.manual_seed(0)
    model = _GuardedMask().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        kept = tuple(model(x)[1].shape)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    shapes = {tuple(o.shape) for n in r.nodes for o in n.outputs}
    assert kept in shapes and (1, 8, 256) not in shapes  # the mask's, not the fallback's flatten
    assert any("shapes depend on tensor values (index)" in note for note in r.meta.capture_notes)


@pytest.mark.parametrize("capture", ["fx", "hooks", "export"])
def test_shapes_that_depend_on_values_are_the_models(capture: str) -> None:
    torch.manual_seed(0)
    model = _KeepPositive().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        kept = convert(copy.deepcopy(model))(x.to(memory_format=torch.channels_last)).shape
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert kept in [tuple(o.shape) for n in r.nodes for o in n.outputs]
    assert any("shapes depend on tensor values (index)" in note for note in r.meta.capture_notes)


class _KeywordInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * mask


def test_keyword_inputs_that_name_the_first_input_add_no_default_sample() -> None:
    """``forward(x=..., mask=...)`` given whole as keyword arguments: a default 1x3x224x224 sample
    besides them made forward get ``x`` twice."""
    x, mask = torch.randn(2, 3, 8, 8), torch.ones(2, 8, 8, 8)
    report = audit(_KeywordInputs().eval(), example_kwargs={"x": x, "mask": mask}, bandwidth=1e9)
    assert report.meta.capture == "fx" and report.summary.spatial_nodes > 0


@dataclasses.dataclass
class _Out:
    feat: torch.Tensor
    out: torch.Tensor


class _RecordOutput(torch.nn.Module):
    def __init__(self, record: bool) -> None:
        super().__init__()
        self.record = record
        self.a, self.norm = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.InstanceNorm2d(8)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.norm(self.a(x))
        return _Out(y, self.b(y)) if self.record else (y, self.b(y))


@pytest.mark.parametrize("train", [False, True])
def test_a_dataclass_output_is_audited_as_a_tuple_is(train: bool) -> None:
    """The dataclass's constructor node was charged as a mixed op (its NCHW and NHWC fields), and
    a train audit's loss saw no output tensor, so no backward was charged."""
    x = torch.randn(2, 3, 8, 8)
    found = []
    for record in (True, False):
        torch.manual_seed(0)
        model = _RecordOutput(record).train(train)
        r = audit(model, x, bandwidth=1e9, train=train)
        found.append(sorted((f.kind.value, f.bytes) for f in r.findings))
    assert found[0] == found[1] and ("backward" in {k for k, _ in found[0]}) == train


class _NormThenViewHead(nn.Module):
    """An InstanceNorm (a revert and the conversion after it), then ``view(n, -1)`` of the map: a break."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.norm(self.conv1(x)))
        return self.fc(y.view(y.shape[0], -1))


def test_check_lists_a_break_first_then_the_rest_in_graph_order() -> None:
    # the break (the converted model raises there) was listed last, after the findings before it in the
    # graph; the CLI's --fail-on line showed five and hid it behind "+1 more" (a new user's trial)
    with pytest.raises(ChannelsLastError) as exc:
        check(_NormThenViewHead(), torch.randn(2, 3, 8, 8), bandwidth=BANDWIDTH)
    offenders = exc.value.offenders  # type: ignore[attr-defined]
    assert [f.kind.value for f in offenders][0] == "break"
    rest = [f.index for f in offenders[1:]]
    assert rest == sorted(rest) and len(rest) >= 2  # the others in graph order
    assert str(exc.value).splitlines()[1].lstrip().startswith("1. break: view")
