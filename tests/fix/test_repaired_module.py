"""What a user does with a repaired module: train it (forward's ``torch.no_grad()`` blocks kept),
pickle it, save it with ``torch.save`` and load it back."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import nhwc_audit
from nhwc_audit.cli import main
from tests.support import printed_elsewhere


class NoGradScale(nn.Module):
    """A scale computed under ``torch.no_grad()`` (or after ``set_grad_enabled(False)``) from the
    conv's output: no gradient flows through it into the conv. fx traces the block's ops, not
    the block: the repaired model sent a gradient through the scale (the conv's weight gradient
    84.6 against 2.8e-05)."""

    def __init__(self, how: str = "no_grad") -> None:
        super().__init__()
        self.c, self.n, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 4, 1)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        if self.how == "no_grad":
            with torch.no_grad():
                scale = y.abs().mean()
        else:
            torch.set_grad_enabled(False)
            scale = y.abs().mean()
            torch.set_grad_enabled(True)
        return self.d(self.n(y)) * scale


def _grads(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    m.zero_grad()
    m(x).sum().backward()
    return [p.grad.clone() for p in m.parameters() if p.grad is not None]


@pytest.mark.parametrize("how", ["no_grad", "set_grad_enabled"])
def test_a_repaired_model_keeps_forwards_gradient_off_blocks(how: str) -> None:
    torch.manual_seed(0)
    model, x = NoGradScale(how).double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    gm, log = nhwc_audit.repair(model, x)
    assert log.changed  # the InstanceNorm rewritten
    expected, got = _grads(model, x), _grads(gm, x.contiguous(memory_format=torch.channels_last))
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    with torch.no_grad():  # a model run under no_grad stays so after the block
        assert not gm(x).requires_grad
    assert torch.is_grad_enabled()


def test_a_repaired_module_pickles_and_saves() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 16, 16)
    gm, _ = nhwc_audit.repair(model, x)
    again = pickle.loads(pickle.dumps(gm))
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        for m in (again, loaded):
            torch.testing.assert_close(m(x), gm(x))


_MODEL_FILE = """
import dataclasses
import torch
from torch import nn


@torch.fx.wrap
def scaled(y, size):
    return y * (1.0 / size)  # fx calls it whole: a global name in the graph's code


@dataclasses.dataclass
class Out:
    mask: torch.Tensor


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.n, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return Out(scaled(self.d(self.n(self.c(x))), x.shape[-1]))


def build():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(2, 3, 16, 16),)
"""


@pytest.mark.parametrize("folder", ["saved_net", "saved-net"])
def test_a_saved_repair_imports_what_its_graph_calls_by_name(
    folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``to_folder`` wrote neither the dataclass the model returns (the saved forward raised
    NameError) nor the function ``torch.fx.wrap`` kept whole (its registration, written inside the
    class body, raised on import). A folder name that is no identifier is loaded by importlib."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "netfile.py").write_text(_MODEL_FILE)
    assert main(["netfile.py:build", "--apply", "--save-repaired", folder, "--no-report", "--quiet"]) == 0
    load = (
        f"from {folder} import Repaired"
        if folder.isidentifier()
        else f"Repaired = importlib.import_module({folder!r}).Repaired"
    )
    assert f"# Load it: {load}" in (tmp_path / folder / "module.py").read_text()
    check = (
        "import importlib, sys, torch\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        f"{load}\n"
        "spec = importlib.util.spec_from_file_location('netfile_again', sys.path[0] + '/netfile.py')\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "model, (x,) = mod.build()\n"
        "rep = Repaired()\n"
        "model.load_state_dict({k: v for k, v in rep.state_dict().items() if k in model.state_dict()})\n"
        "with torch.no_grad():\n"
        "    got, want = rep(x.to(memory_format=torch.channels_last)), model(x)\n"
        "torch.testing.assert_close(got.mask, want.mask, rtol=1e-4, atol=1e-5)\n"
        "print(type(got).__name__)\n"
    )
    assert printed_elsewhere(tmp_path, check) == ["Out"]


def test_a_save_that_writes_nothing_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "netfile.py").write_text(_MODEL_FILE)
    assert main(["netfile.py:build", "--save-repaired", "saved.net", "--no-report", "--quiet"]) == 2
    err = capsys.readouterr().err  # refused before the audit (a save that fails after it: the half-way test)
    assert "nhwc-audit: error: cannot save to 'saved.net': the folder is imported as a package" in err
    assert not (tmp_path / "saved.net").exists()
    (tmp_path / "taken").write_text("a file, not a folder")  # refused before the audit
    assert main(["netfile.py:build", "--save-repaired", "taken", "--no-report", "--quiet"]) == 2
    assert "nhwc-audit: error: cannot write 'taken': it is a file" in capsys.readouterr().err


def test_a_repair_of_a_model_on_the_meta_device_says_so() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8))
    with pytest.raises(nhwc_audit.ConversionError, match="meta device .*'0.weight'.*build it on cpu/cuda"):
        nhwc_audit.repair(model, torch.randn(1, 3, 16, 16))


class Float32Head(nn.Module):
    """A head the model keeps in float32 under autocast (``torch.autocast(..., enabled=False)``):
    fx traced its ops, not the block, and the repaired model run under autocast computed it in
    bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.n = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.InstanceNorm2d(8)
        self.h = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n(self.a(x))
        with torch.autocast("cpu", enabled=False):
            return self.h(y.float())


def test_a_repaired_model_keeps_forwards_autocast_blocks() -> None:
    torch.manual_seed(0)
    model, x = Float32Head().eval(), torch.randn(2, 3, 16, 16)
    gm, log = nhwc_audit.repair(model, x)
    assert log.changed
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(x), gm(x.contiguous(memory_format=torch.channels_last))
        assert torch.is_autocast_enabled("cpu")  # the block left as it was entered
    assert want.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_a_pickled_repair_with_forwards_blocks_refuses_to_load_without_them() -> None:
    """A GraphModule loads from a pickle by tracing its code again, which runs the calls that
    enter and leave the blocks instead of recording them: the module loaded would send gradients
    through the no_grad block again. It refuses, saying what to do."""
    torch.manual_seed(0)
    gm, _ = nhwc_audit.repair(NoGradScale(), torch.randn(2, 3, 16, 16))
    data = pickle.dumps(gm)
    with pytest.raises(RuntimeError, match="no_grad.*--save-repaired"):
        pickle.loads(data)
    assert torch.is_grad_enabled()


class RaisesInBlock(nn.Module):
    """Raises inside its autocast block on a 16-wide input (a Linear over W)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.lin = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.InstanceNorm2d(8), nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n(self.a(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.lin(y)


def test_a_repair_whose_graph_raises_inside_a_block_leaves_autocast_and_grad_as_they_were() -> None:
    torch.manual_seed(0)
    with pytest.raises(Exception):  # noqa: B017 - the model's own error, whatever the stage that meets it
        nhwc_audit.repair(RaisesInBlock(), torch.randn(2, 3, 16, 16))
    assert not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()


class CudaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.h = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.InstanceNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n(self.a(x))
        with torch.autocast("cuda", dtype=torch.float16):
            return self.h(y)


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_a_cuda_autocast_block_is_kept_as_asked_on_a_machine_without_cuda() -> None:
    """torch turns a CUDA autocast block off in the object itself where CUDA is missing: the
    repaired graph entered it off, and would run it in float32 on a GPU."""
    torch.manual_seed(0)
    gm, _ = nhwc_audit.repair(CudaBlock().eval(), torch.randn(2, 3, 16, 16))
    entered = [n.args for n in gm.graph.nodes if "enter_autocast" in str(n.target)]
    assert entered == [("cuda", torch.float16, True, True)]


def test_a_saved_repair_imports_the_model_files_own_imports_and_names_its_folder_as_a_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocks.py").write_text(
        "import dataclasses, torch\n\n\n@dataclasses.dataclass\nclass Out:\n    mask: torch.Tensor\n"
    )
    (tmp_path / "netfile.py").write_text(
        _MODEL_FILE.replace("@dataclasses.dataclass\nclass Out:\n    mask: torch.Tensor\n", "from blocks import Out\n")
    )
    assert main(["netfile.py:build", "--apply", "--save-repaired", "saved", "--no-report", "--quiet"]) == 0
    check = f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nfrom saved import Repaired\nprint(type(Repaired()).__name__)\n"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=elsewhere, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for bad in ("saved.net", "class"):
        assert main(["netfile.py:build", "--apply", "--save-repaired", bad, "--no-report", "--quiet"]) == 2
        assert "imported as a package" in capsys.readouterr().err


class LinearInBlock(nn.Module):
    """A Linear over W inside a no_grad or an autocast block: raises there on a map not 12 wide."""

    def __init__(self, block: str) -> None:
        super().__init__()
        self.a, self.n, self.lin = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.InstanceNorm2d(8), nn.Linear(12, 12)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n(self.a(x))
        if self.block == "no_grad":
            with torch.no_grad():
                s = self.lin(y).mean()
            return y * s
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.lin(y)


@pytest.mark.parametrize("block", ["no_grad", "autocast"])
def test_a_repaired_module_that_raises_inside_a_block_leaves_grad_and_autocast_as_they_were(block: str) -> None:
    """Eager's ``with`` blocks put grad mode and autocast back on the way out of an error; the
    repaired graph's plain calls left them set (after no_grad: grad off for the rest of the process)."""
    torch.manual_seed(0)
    gm, _ = nhwc_audit.repair(LinearInBlock(block).eval(), torch.randn(2, 3, 16, 12))  # (rewritten or not)
    with pytest.raises(RuntimeError):
        gm(torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last))
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")


def test_a_save_that_fails_half_way_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TorchScript submodule pickles only in part: the folder held pre.pt and state_dict.pt where
    the CLI said 'nothing written'. The package is written beside it and moved in whole."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scripted.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n"
        "    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8),\n"
        "                      torch.jit.script(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())))\n"
        "    return m.eval(), (torch.randn(1, 3, 16, 16),)\n"
    )
    assert main(["scripted.py:build", "--apply", "--save-repaired", "out/pkg", "--no-report", "--quiet"]) == 2
    assert "--save-repaired out/pkg: nothing written" in capsys.readouterr().err
    assert not (tmp_path / "out" / "pkg").exists() and not list((tmp_path / "out").iterdir())


def test_a_saved_repair_gives_a_tied_weight_its_format_under_each_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The formats were listed by ``named_parameters()``, which names a tied weight once: the second
    module's copy, which loading a state dict makes, stayed NCHW."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tied.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Tied(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)\n"
        "        self.b.weight = self.a.weight\n"
        "    def forward(self, x):\n"
        "        return self.b(self.a(self.stem(x))).contiguous() + 1\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return Tied().eval(), (torch.randn(1, 3, 16, 16),)\n"
    )
    assert main(["tied.py:build", "--save-repaired", "pkgtied", "--no-report", "--quiet"]) == 0
    check = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from pkgtied import Repaired\n"
        "m = Repaired()\n"
        "print(all(w.is_contiguous(memory_format=torch.channels_last) for n, w in m.named_parameters(remove_duplicate=False) if w.dim() == 4))\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["True"], proc.stderr[-2000:]


@pytest.mark.slow
def test_the_api_repair_keeps_the_rewrites_the_audits_repair_keeps() -> None:
    """``nhwc_audit.repair`` counted every copy whole where ``audit(...).repaired()`` counts what
    channels_last adds over NCHW: on a small MaxViT it kept one of the three ``contiguous(memory_format=
    channels_last)`` insertions before its window partitions (torchvision's maxvit_t at 224: 3 of 9,
    4.0 MB a forward left unremoved), refusing the rest as 'removes no layout change'."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.MaxVit(
        input_size=(112, 112),
        stem_channels=16,
        partition_size=7,
        block_channels=[16, 32],
        block_layers=[2, 2],
        head_dim=8,
        stochastic_depth_prob=0.0,
    ).eval()
    x = torch.randn(1, 3, 112, 112)
    gm, log = nhwc_audit.repair(model, x)
    by_audit = nhwc_audit.audit(model, x).repaired().repair
    assert by_audit is not None and len(by_audit.steps) == 3
    assert log.steps == by_audit.steps and log.bytes_after == by_audit.bytes_after
    assert type(gm).__name__ == "MaxVit"


class _CountingNorm(nn.BatchNorm2d):
    """timm's BatchNormAct2d: ``F.batch_norm`` on its buffers, and ``num_batches_tracked`` counted in
    Python, which fx runs once while tracing: the graph never reads that buffer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        w, b = self.weight, self.bias
        return torch.relu(torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, w, b, True, 0.1))


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_repaired_model_keeps_the_buffers_its_graph_does_not_read(checkpointed: bool) -> None:
    """timm coatnet_0_rw_224's repaired state_dict lacked its 16 ``num_batches_tracked``: a strict
    ``load_state_dict`` of the model's own weights raised (with its checkpoints kept or not)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.n, self.d = nn.Conv2d(3, 8, 3, padding=1), _CountingNorm(8), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c(x)
            y = checkpoint(self.n, y, use_reentrant=False) if checkpointed else self.n(y)
            return self.d(y)

    torch.manual_seed(0)
    model = Net().train()
    gm, _ = nhwc_audit.repair(model, torch.randn(2, 3, 16, 16))
    assert gm.state_dict().keys() == model.state_dict().keys()
    gm.load_state_dict(model.state_dict())
    # and counts its batches as the model does: the graph advances the counter fx ran once
    for _ in range(3):
        x = torch.randn(2, 3, 16, 16)
        model(x), gm(x.contiguous(memory_format=torch.channels_last))
    assert int(gm.state_dict()["n.num_batches_tracked"]) == int(model.n.num_batches_tracked) == 3
    # a pickle loads by tracing the code again, where torch's Tracer would run the update once, unrecorded
    loaded = pickle.loads(pickle.dumps(gm))
    assert int(loaded.get_buffer("n.num_batches_tracked")) == 3
    loaded(torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last))
    assert int(loaded.get_buffer("n.num_batches_tracked")) == 4


def test_a_repaired_model_keeps_the_modules_its_graph_does_not_call_and_every_name_of_a_shared_one() -> None:
    """A helper's sweep of repaired models in training use: a strict ``load_state_dict`` of the
    model's own weights raised where fx drops what forward never calls (segmentation_models_pytorch's
    EfficientNet encoder's unused head, an unused scSE attention) or keeps a module held under two
    names once (MONAI DynUNet's ``skip_layers``). The repaired model now has the model's keys, the
    same tensors, and an optimizer sees each parameter once; a non-persistent buffer stays out."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.skip = self.c  # the same module under a second name
            self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))  # never called
            self.scale = nn.Parameter(torch.ones(3))  # never read
            self.register_buffer("cache", torch.zeros(2), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c(x).contiguous()  # (a revert the repair removes)
            return self.d(y)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    gm, log = nhwc_audit.repair(model, x)
    assert log.steps
    assert sorted(gm.state_dict()) == sorted(model.state_dict())
    gm.load_state_dict(model.state_dict())  # strict
    assert len(list(gm.parameters())) == len(list(model.parameters()))
    assert gm.get_parameter("skip.weight") is gm.get_parameter("c.weight")
    with torch.no_grad():
        torch.testing.assert_close(gm(x.contiguous(memory_format=torch.channels_last)), model(x))


_SHARED_FILE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.skip = self.c
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.d(self.c(x).contiguous())


def build():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(2, 3, 16, 16),)
"""


def test_a_saved_repair_holds_a_shared_module_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``to_folder`` pickles each submodule apart: the name a module is held under twice came back
    as a copy of its weights, which training leaves stale and which a ``load_state_dict`` into the
    model then writes over the trained ones. The saved package ties it to the other name again."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sharednet.py").write_text(_SHARED_FILE)
    assert main(["sharednet.py:build", "--apply", "--save-repaired", "saved", "--no-report", "--quiet"]) == 0
    check = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from saved import Repaired\n"
        "import sharednet\n"
        "model, (x,) = sharednet.build()\n"
        "rep = Repaired()\n"
        "rep.load_state_dict(model.state_dict())\n"
        "assert rep.get_parameter('skip.weight') is rep.get_parameter('c.weight')\n"
        "assert len(list(rep.parameters())) == len(list(model.parameters()))\n"
        "assert list(rep.state_dict()) == list(model.state_dict())  # (an optimizer's state fits: the same order)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(rep(x.contiguous(memory_format=torch.channels_last)), model(x))\n"
        "print('ok')\n"
    )
    assert printed_elsewhere(tmp_path, check) == ["ok"]


def test_a_repaired_model_lists_its_parameters_in_the_models_order() -> None:
    """A GraphModule holds its parameters in the order its graph first reads them: an optimizer's
    state (kept by position) saved while training the model, loaded to train the repaired one, raised at
    ``step()`` (timm nf_resnet26: "output with shape [64] doesn't match the broadcast shape") or, where
    shapes matched, moved each parameter by another's moments."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(8, 4, 1)  # registered first, called last
            self.blocks = nn.ModuleDict(
                {"second": nn.Conv2d(8, 8, 3, padding=1), "first": nn.Conv2d(3, 8, 3, padding=1)}
            )
            self.norm = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(self.blocks["first"](x)).contiguous()  # (a revert the repair removes)
            return self.head(self.blocks["second"](y))

    torch.manual_seed(0)
    model, x = Net().train(), torch.randn(2, 3, 16, 16)
    gm, log = nhwc_audit.repair(model, x)
    assert log.steps
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(gm.state_dict()) == list(model.state_dict())
    opt = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    opt.step()
    resumed = torch.optim.Adam(gm.parameters())
    resumed.load_state_dict(opt.state_dict())
    for p, q in zip(gm.parameters(), model.parameters(), strict=True):
        assert p.shape == q.shape
        torch.testing.assert_close(resumed.state[p]["exp_avg"], opt.state[q]["exp_avg"])


class BufferViews(nn.Module):
    """torchvision MaxViT's ``self.relative_position_index.view(-1)``, a scale buffer viewed to
    broadcast: torch's Tracer runs views of buffers and stowed them as the graph's own tensors
    (``_tensor_constant0``): the repaired state_dict had 22 keys more than maxvit_t's, a strict
    ``load_state_dict`` of the model's weights raised, and one not strict left the old values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8)
        self.register_buffer("scale", torch.ones(8))
        self.register_buffer("idx", torch.arange(8))
        self.table = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        return y * self.scale.view(1, -1, 1, 1) + self.table[self.idx.view(-1)].view(1, -1, 1, 1)


def test_a_repaired_model_reads_views_of_its_buffers_through_them() -> None:
    torch.manual_seed(0)
    model, x = BufferViews().eval(), torch.randn(2, 3, 16, 16)
    gm, log = nhwc_audit.repair(model, x)
    assert log.steps and gm.state_dict().keys() == model.state_dict().keys()
    other = BufferViews().eval()
    with torch.no_grad():
        other.scale.fill_(3.0)
    gm.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x.contiguous(memory_format=torch.channels_last)), other(x))


class SharedStorageBuffers(nn.Module):
    """Two buffers in one storage (rows of one tensor), each viewed to broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8)
        rows = torch.rand(2, 8) + 0.5
        self.register_buffer("mean", rows[0])
        self.register_buffer("scale", rows[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.norm(self.conv(x)) - self.mean.view(1, -1, 1, 1)) * self.scale.view(1, -1, 1, 1)


def test_a_repaired_model_reads_a_buffer_at_its_own_place_in_a_shared_storage() -> None:
    """The view's storage offset was taken from the traced copy, whose buffers each had a storage of
    their own: the repaired model read ``scale`` at ``mean``'s place (outputs 1.15 off the model's)."""
    torch.manual_seed(0)
    model, x = SharedStorageBuffers().eval(), torch.randn(2, 3, 16, 16)
    gm, log = nhwc_audit.repair(model, x)
    assert log.steps
    with torch.no_grad():
        torch.testing.assert_close(gm(x.contiguous(memory_format=torch.channels_last)), model(x))
