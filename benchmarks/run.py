"""nhwc-audit benchmark suite: everything side by side in one process (warm-up, several
repeats, median and min/max), written to benchmarks/results/ as markdown and JSON.

    python benchmarks/run.py [--repeats 5] [--quick]

Measures: real-mode audit vs one eager channels_last forward (with and without the fx
fidelity check), fake-mode audit time and peak RSS (one process per model, plus a Stable
Diffusion 1.5-sized UNet on the meta device), Stable Diffusion 1.5's UNet in real mode (time
and peak RSS beside its forward), the CLI end to end against importing what it imports (wall
time and peak RSS per process), the repair (``--apply``) beside its audit, and how audit time grows with depth (resnet18..152) and input
size (resnet18, 64^2..512^2).
No assertions: a table to read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import nhwc_audit
from nhwc_audit.zoo.models import build

OUT = Path(__file__).resolve().parent / "results"


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: _stats(v) for k, v in times.items()}


def _channels_last(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The sample as a channels_last model's user passes it: 4D tensors channels_last."""
    return tuple(
        a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a
        for a in args
    )


def audit_vs_forward(
    name: str, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], repeats: int
) -> dict[str, Any]:
    cl_model = nhwc_audit.convert(model)
    cl_args = _channels_last(args)

    def forward() -> None:
        with torch.no_grad():
            cl_model(*cl_args, **kwargs)

    fns = {
        "forward": forward,
        "audit": lambda: nhwc_audit.audit(model, args, example_kwargs=kwargs),
        "audit_no_verify": lambda: nhwc_audit.audit(model, args, example_kwargs=kwargs, verify=False),
        "audit_fake": lambda: nhwc_audit.audit(model, args, example_kwargs=kwargs, mode="fake"),
    }
    r = _interleaved(fns, repeats)
    f = r["forward"]["median"]
    return {
        "model": name,
        "inputs": " ".join("x".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor)),
        **{k: v for k, v in r.items()},
        "ratio": r["audit"]["median"] / f,
        "ratio_no_verify": r["audit_no_verify"]["median"] / f,
    }


def train_vs_step(name: str, model: torch.nn.Module, args: tuple[Any, ...], repeats: int) -> dict[str, Any]:
    """``audit(train=True)`` beside one eager training step of the channels_last model (forward,
    a linear loss, backward into the parameters' ``.grad``), interleaved."""
    cl_model = nhwc_audit.convert(model)
    cl_args = _channels_last(args)

    def step() -> None:
        cl_model.zero_grad(set_to_none=True)
        out = cl_model(*cl_args)
        sum(t.float().sum() for t in ([out] if isinstance(out, torch.Tensor) else out)).backward()

    r = _interleaved({"step": step, "audit_train": lambda: nhwc_audit.audit(model, args, train=True)}, repeats)
    return {
        "model": name,
        "inputs": " ".join("x".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor)),
        **r,
        "ratio": r["audit_train"]["median"] / r["step"]["median"],
    }


_CHILD_PRELUDE = """
import json, sys, time, warnings, torch
warnings.filterwarnings("ignore")
import nhwc_audit
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
"""
"""What the fresh benchmark processes start with: quiet imports and a reader of the kernel's
memory figures (VmRSS now, VmHWM the peak)."""

_FAKE_SCRIPT = (
    _CHILD_PRELUDE
    + """
name = sys.argv[1]
if name == "sd15":
    from nhwc_audit.zoo.large import sd15_meta
    model, args, kwargs = sd15_meta()  # Stable Diffusion 1.5's configuration, on the meta device
else:
    from nhwc_audit.zoo.models import build
    model, args, kwargs = build(name)
nhwc_audit.audit(model, args, example_kwargs=kwargs, mode="fake")  # warm-up: imports, first-call costs
built = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    r = nhwc_audit.audit(model, args, example_kwargs=kwargs, mode="fake")
    times.append(time.perf_counter() - t)
peak = status("VmHWM")
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"times": times, "built_rss": built, "peak_rss": peak, "params": params, "nodes": len(r.nodes)}))
"""
)


def fake_memory(names: list[str], repeats: int) -> list[dict[str, Any]]:
    """Fake-mode audit time and memory, one fresh process per model: RSS before the timed
    audits (model built, one warm-up audit done) and the peak during them (Linux: the peak is
    reset through /proc/self/clear_refs)."""
    rows = []
    for name in names:
        proc = subprocess.run(
            [sys.executable, "-c", _FAKE_SCRIPT, name, str(repeats)], capture_output=True, text=True, check=True
        )
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        times = out.pop("times")
        rows.append({"model": name, **out, **_stats(times)})
        print("fake", name, f"{rows[-1]['median']:.2f} s", flush=True)
    return rows


_SD15_REAL_SCRIPT = (
    _CHILD_PRELUDE
    + """
from diffusers import UNet2DConditionModel
torch.manual_seed(0)
model = UNet2DConditionModel(cross_attention_dim=768).eval()  # random float32 weights, 3.4 GB
args = (torch.randn(1, 4, 64, 64), torch.tensor([10]), torch.randn(1, 77, 768))
built = status("VmRSS")
times = []
if sys.argv[1] == "forward":
    model = model.to(memory_format=torch.channels_last)  # in place, as a user converts
    args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    with torch.no_grad():
        for _ in range(int(sys.argv[2])):
            t = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - t)
else:
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter()
        r = nhwc_audit.audit(model, args, bandwidth=1e10)
        times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "built_rss": built, "peak_rss": status("VmHWM")}))
"""
)


def sd15_real(repeats: int) -> dict[str, Any]:
    """Stable Diffusion 1.5's UNet with random float32 weights (1x4x64x64 latents, 77x768
    text), real mode: one fresh process for the eager channels_last forwards, one for the
    audits; time and each process's peak RSS (the audit's must not hold a second copy of the
    weights)."""
    out: dict[str, Any] = {}
    for what in ("forward", "audit"):
        proc = subprocess.run(
            [sys.executable, "-c", _SD15_REAL_SCRIPT, what, str(repeats)], capture_output=True, text=True, check=True
        )
        d = json.loads(proc.stdout.strip().splitlines()[-1])
        out[what] = {**_stats(d.pop("times")), **d}
        print("sd15 real", what, f"{out[what]['median']:.1f} s", flush=True)
    return out


UNTRACEABLE = [
    "diffusers.UNet2DModel",
    "timm.mobilevitv2_050",
    "timm.efficientvit_b0",
    "smp.FPN",
    "monai.BasicUNet2d",
    "transformers.Segformer",
    "ultralytics.yolo11n",
]
"""Models torch.fx cannot trace (or whose fx graph is wrong): captured by the eager recording,
or by torch.export when a graph is needed."""


def untraceable(names: list[str], repeats: int) -> list[dict[str, Any]]:
    """The audit of models fx cannot trace, with the default capture (fx fails, then the eager
    recording) and with torch.export forced, beside one eager channels_last forward."""
    rows = []
    for name in names:
        model, args, kwargs = build(name)
        cl_model = nhwc_audit.convert(model)
        cl_args = _channels_last(args)

        def forward(
            cl_model: torch.nn.Module = cl_model, cl_args: tuple[Any, ...] = cl_args, kwargs: dict[str, Any] = kwargs
        ) -> None:
            with torch.no_grad():
                cl_model(*cl_args, **kwargs)

        def run(
            capture: str, model: torch.nn.Module = model, args: tuple[Any, ...] = args, kwargs: dict[str, Any] = kwargs
        ) -> Any:
            return nhwc_audit.audit(model, args, example_kwargs=kwargs, bandwidth=1e10, capture=capture)  # type: ignore[arg-type]

        r = _interleaved({"forward": forward, "audit": lambda: run("auto"), "export": lambda: run("export")}, repeats)
        f = r["forward"]["median"]
        rows.append(
            {
                "model": name,
                "capture": run("auto").meta.capture,
                **r,
                "ratio": r["audit"]["median"] / f,
                "ratio_export": r["export"]["median"] / f,
                "over_goal": r["audit"]["median"] / (2 * f + 0.3),
            }
        )
        print("untraceable", name, f"{rows[-1]['ratio']:.1f}x (export {rows[-1]['ratio_export']:.1f}x)", flush=True)
    return rows


_LAUNCH = """
import json, os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.perf_counter() - t, "peak_rss": usage.ru_maxrss * 1024,
                  "code": os.waitstatus_to_exitcode(status)}))
"""
"""Runs a command from a small process: a child's peak RSS counts the pages of the process it
was forked (or vforked) from until its exec, so the benchmark's own 0.5-1.4 GB must not be it."""


def cli_vs_import(repeats: int, quick: bool) -> dict[str, Any]:
    """Whole processes, interleaved: wall time and each process's own peak RSS."""
    py = sys.executable
    out = tempfile.mkdtemp(prefix="nhwc-bench-")
    cli = [py, "-m", "nhwc_audit"]
    cmds = {
        "import_torch": [py, "-c", "import torch"],
        "import_torch_tv": [py, "-c", "import torch, torchvision"],
        "cli_help": [*cli, "--help"],
        "cli_resnet50": [*cli, "nhwc_audit.zoo.models:cli_resnet50", "--no-report", "--quiet"],
        "cli_resnet50_reports": [*cli, "nhwc_audit.zoo.models:cli_resnet50", "--quiet", "--json", f"{out}/r.json"]
        + ["--html", f"{out}/r.html"],
        "cli_unet": [*cli, "nhwc_audit.examples:unet", "--no-report", "--quiet"],
        "cli_unet_apply": [*cli, "nhwc_audit.examples:unet", "--no-report", "--quiet", "--apply"],
    }
    if not quick:
        cmds["import_diffusers"] = [py, "-c", "import torch; from diffusers import UNet2DConditionModel"]
        cmds["cli_sd15_fake"] = [*cli, "nhwc_audit.zoo.large:sd15_meta", "--mode", "fake", "--quiet"]
        cmds["cli_sd15_fake"] += ["--json", f"{out}/sd.json", "--html", f"{out}/sd.html"]
    times: dict[str, list[float]] = {k: [] for k in cmds}
    peaks: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(repeats):
        for k, cmd in cmds.items():
            proc = subprocess.run([py, "-c", _LAUNCH, *cmd], capture_output=True, text=True, check=True)
            d = json.loads(proc.stdout)
            if d["code"] not in (0, 1):  # 1: findings
                raise RuntimeError(f"{' '.join(cmd)} exited with {d['code']}")
            times[k].append(d["wall"])
            peaks[k].append(d["peak_rss"])
    shutil.rmtree(out, ignore_errors=True)
    return {k: {**_stats(v), "peak_rss": max(peaks[k])} for k, v in times.items()}


def repair_vs_audit(repeats: int) -> dict[str, Any]:
    """The bundled UNet: one audit, and the repair of that audit (``report.repaired()``, what
    ``--apply`` runs), interleaved."""
    from nhwc_audit.examples import unet

    m, (x,) = unet()
    reports: list[Any] = []

    def audit() -> None:
        reports[:] = [nhwc_audit.audit(m, x, bandwidth=1e10)]

    audit()
    r = _interleaved({"audit": audit, "repair": lambda: reports[0].repaired()}, repeats)
    log = reports[0].repaired().repair
    return {**r, "nodes": len(reports[0].nodes), "steps": len(log.steps) if log is not None else 0}


def repair_maxvit() -> dict[str, Any]:
    """torchvision's MaxViT-T at 224x224 (1,633 nodes, one candidate rewrite per attention block):
    one audit and one repair, timed once each (the repair takes seconds)."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    m, x = tvm.maxvit_t().eval(), torch.randn(1, 3, 224, 224)
    t = time.perf_counter()
    report = nhwc_audit.audit(m, x)
    audit_s = time.perf_counter() - t
    t = time.perf_counter()
    log = report.repaired().repair
    repair_s = time.perf_counter() - t
    assert log is not None
    tried = len(log.steps) + len(log.refused)
    return {"audit": audit_s, "repair": repair_s, "nodes": len(report.nodes), "steps": len(log.steps), "tried": tried}


def scaling(repeats: int, quick: bool) -> list[dict[str, Any]]:
    import torchvision.models as tvm

    def row(case: str, m: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
        cl, xc = nhwc_audit.convert(m), x.contiguous(memory_format=torch.channels_last)

        def forward() -> None:
            with torch.no_grad():
                cl(xc)

        r = _interleaved({"forward": forward, "audit": lambda: nhwc_audit.audit(m, x, bandwidth=1e10)}, repeats)
        nodes = len(nhwc_audit.audit(m, x, bandwidth=1e10).nodes)
        extra = r["audit"]["median"] - r["forward"]["median"]
        return {
            "case": case,
            "nodes": nodes,
            "forward": r["forward"],
            **r["audit"],
            "ms_per_node": 1e3 * r["audit"]["median"] / nodes,
            "overhead_ms_per_node": 1e3 * extra / nodes,
        }

    rows = []
    for depth in ("resnet18", "resnet50") if quick else ("resnet18", "resnet50", "resnet101", "resnet152"):
        rows.append(row(f"{depth} 224^2", getattr(tvm, depth)(weights=None).eval(), torch.randn(1, 3, 224, 224)))
    m18 = tvm.resnet18(weights=None).eval()
    for size in (64, 128) if quick else (64, 128, 256, 512):
        rows.append(row(f"resnet18 {size}^2", m18, torch.randn(1, 3, size, size)))
    # many nodes, little compute: the per-node cost the goal names (<= 0.1 ms beyond the forward)
    many: list[tuple[str, Callable[[], torch.nn.Module]]] = [
        ("densenet121", lambda: tvm.densenet121(weights=None)),
        ("convnext_tiny", lambda: tvm.convnext_tiny(weights=None)),
    ]
    try:
        import timm

        def timm_model(n: str) -> Callable[[], torch.nn.Module]:
            return lambda: timm.create_model(n, pretrained=False)

        many += [(f"timm {n}", timm_model(n)) for n in ("regnety_002", "efficientnet_b0")]
    except ImportError:
        pass
    for name, make in many[:1] if quick else many:
        rows.append(row(f"{name} 64^2", make().eval(), torch.randn(1, 3, 64, 64)))
    return rows


class _Chain(torch.nn.Module):
    """A conv and then ``n`` (relu, add) pairs: a graph of 2n + 3 nodes with almost no compute."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv(x)
        for _ in range(self.n):
            y = torch.relu(y) + 1.0
        return y


def graph_size(repeats: int, quick: bool) -> list[dict[str, Any]]:
    """Audit and analysis time per node on graphs of growing size (linear: flat per node)."""
    from nhwc_audit.analyze.analysis import analyze

    rows = []
    for n in (500, 2000) if quick else (500, 2000, 8000):
        m, x = _Chain(n), torch.randn(1, 3, 4, 4)
        r = _interleaved({"audit": lambda m=m, x=x: nhwc_audit.audit(m, x, bandwidth=1e10)}, repeats)["audit"]
        records = list(nhwc_audit.audit(m, x, bandwidth=1e10).nodes)
        t = _interleaved({"analyze": lambda rec=records: analyze(rec, bandwidth=1e10)}, repeats)["analyze"]
        nodes = len(records)
        rows.append(
            {
                "nodes": nodes,
                **r,
                "us_per_node": 1e6 * r["median"] / nodes,
                "analyze": t,
                "analyze_us_per_node": 1e6 * t["median"] / nodes,
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="fewer models and sizes")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    names = [
        "torchvision.resnet50",
        "torchvision.densenet121",
        "torchvision.convnext_tiny",
        "diffusers.UNet2DModel",
        "monai.UNet2d",
    ]
    if a.quick:
        names = names[:1]
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": dt.date.today().isoformat(),
        "audit_vs_forward": [],
    }
    from nhwc_audit.examples import unet

    um, (ux,) = unet()
    results["audit_vs_forward"].append(audit_vs_forward("examples.unet", um, (ux,), {}, a.repeats))
    for name in names:
        m, args, kwargs = build(name)
        results["audit_vs_forward"].append(audit_vs_forward(name, m, args, kwargs, a.repeats))
        print(results["audit_vs_forward"][-1]["model"], f"{results['audit_vs_forward'][-1]['ratio']:.2f}x", flush=True)
    m, args, kwargs = build("torchvision.resnet50")
    m8 = (torch.randn(8, 3, 224, 224),)
    results["audit_vs_forward"].append(
        audit_vs_forward("torchvision.resnet50 (batch 8)", m, m8, {}, max(3, a.repeats // 2))
    )
    results["train"] = [
        train_vs_step("examples.unet", um, (ux,), a.repeats),
        train_vs_step("torchvision.resnet50", m, (torch.randn(1, 3, 224, 224),), a.repeats),
    ]
    if not a.quick:
        results["train"].append(train_vs_step("torchvision.resnet50 (batch 8)", m, m8, max(3, a.repeats // 2)))
    results["untraceable"] = untraceable(UNTRACEABLE[:2] if a.quick else UNTRACEABLE, max(3, a.repeats // 2))
    results["fake"] = fake_memory([*names, *(() if a.quick else ("sd15",))], 3)
    if not a.quick:
        results["sd15_real"] = sd15_real(2)
    results["cli"] = cli_vs_import(3, a.quick)
    results["repair"] = repair_vs_audit(max(3, a.repeats // 2))
    if not a.quick:
        results["repair_maxvit"] = repair_maxvit()
    results["scaling"] = scaling(7, a.quick)
    results["graph_size"] = graph_size(3, a.quick)
    OUT.mkdir(exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "results.md").write_text(_markdown(results))
    print((OUT / "results.md").read_text())


def _ms(s: dict[str, float]) -> str:
    return f"{1e3 * s['median']:.0f} ms ({1e3 * s['min']:.0f}-{1e3 * s['max']:.0f})"


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# nhwc-audit benchmarks ({r['date']}, torch {r['torch']}, {r['threads']} CPU threads)",
        "",
        "Generated by `python benchmarks/run.py`. Median (min-max) of interleaved repeats in one process.",
        "",
        "## Real-mode audit vs one eager channels_last forward",
        "",
        "| model | input | forward | audit | audit --no-verify | fake-mode audit | audit/forward | no-verify/forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["audit_vs_forward"]:
        lines.append(
            f"| {row['model']} | {row['inputs']} | {_ms(row['forward'])} | {_ms(row['audit'])} | {_ms(row['audit_no_verify'])} | "
            f"{_ms(row['audit_fake'])} | {row['ratio']:.2f}x | {row['ratio_no_verify']:.2f}x |"
        )
    lines += [
        "",
        "## `--train` audit vs one eager channels_last training step",
        "",
        "The step: forward, a linear loss, backward into the parameters' `.grad`. The audit's backward starts",
        "from its own forward (run with autograd), so the model runs forward once.",
        "",
        "| model | input | training step | audit --train | audit/step |",
        "|---|---|---|---|---|",
        *(
            f"| {row['model']} | {row['inputs']} | {_ms(row['step'])} | {_ms(row['audit_train'])} | {row['ratio']:.2f}x |"
            for row in r.get("train", [])
        ),
    ]
    lines += [
        "",
        "## Models torch.fx cannot trace: the eager recording (default) vs torch.export",
        "",
        "Goal: audit <= 2 x forward + 0.3 s (the *vs goal* column: below 1.00 meets it).",
        "",
        "| model | capture | forward | audit | audit with --capture export | audit/forward | export/forward | vs goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r.get("untraceable", []):
        lines.append(
            f"| {row['model']} | {row['capture']} | {_ms(row['forward'])} | {_ms(row['audit'])} | {_ms(row['export'])} | "
            f"{row['ratio']:.1f}x | {row['ratio_export']:.1f}x | {row['over_goal']:.2f} |"
        )
    lines += [
        "",
        "## Fake-mode audit: time and peak memory (one fresh process per model)",
        "",
        "`sd15` is a UNet2DConditionModel in Stable Diffusion 1.5's configuration built on the meta device.",
        "",
        "| model | parameters | nodes | fake-mode audit | process RSS before | peak RSS during the audits | audit's extra |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["fake"]:
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.1f} M | {row['nodes']} | {_ms(row)} | "
            f"{row['built_rss'] / 2**20:.0f} MiB | {row['peak_rss'] / 2**20:.0f} MiB | "
            f"{(row['peak_rss'] - row['built_rss']) / 2**20:.0f} MiB |"
        )
    if "sd15_real" in r:
        f, au = r["sd15_real"]["forward"], r["sd15_real"]["audit"]
        lines += [
            "",
            "## Stable Diffusion 1.5's UNet in real mode (random float32 weights, 1x4x64x64, text 77x768)",
            "",
            "One fresh process each: the model built (RSS after), then timed; peak RSS of the process.",
            "",
            "| run | time | RSS, model built | peak RSS | peak over built |",
            "|---|---|---|---|---|",
            f"| eager channels_last forward | {_ms(f)} | {f['built_rss'] / 2**30:.2f} GiB | "
            f"{f['peak_rss'] / 2**30:.2f} GiB | {(f['peak_rss'] - f['built_rss']) / 2**30:.2f} GiB |",
            f"| audit (real mode) | {_ms(au)} | {au['built_rss'] / 2**30:.2f} GiB | "
            f"{au['peak_rss'] / 2**30:.2f} GiB | {(au['peak_rss'] - au['built_rss']) / 2**30:.2f} GiB |",
            "",
            f"audit / forward: {au['median'] / f['median']:.2f}x.",
        ]
    c = r["cli"]
    lines += [
        "",
        "## CLI end to end",
        "",
        "Whole processes, interleaved; peak RSS of each process. The goals: resnet50 <= 1.0 s over",
        "importing torch and torchvision; the SD-1.5-sized fake audit < 7 s and < 1 GB.",
        "",
        "| command | wall | over its floor | peak RSS |",
        "|---|---|---|---|",
    ]
    floors = {
        "cli_resnet50": "import_torch_tv",
        "cli_resnet50_reports": "import_torch_tv",
        "cli_sd15_fake": "import_diffusers",
        "cli_unet_apply": "cli_unet",
    }
    labels = {
        "import_torch": "`python -c 'import torch'`",
        "import_torch_tv": "`python -c 'import torch, torchvision'`",
        "import_diffusers": "`python -c 'import torch; from diffusers import UNet2DConditionModel'`",
        "cli_help": "`nhwc-audit --help`",
        "cli_resnet50": "`nhwc-audit nhwc_audit.zoo.models:cli_resnet50 --no-report --quiet`",
        "cli_resnet50_reports": "the same, writing the JSON and HTML reports",
        "cli_sd15_fake": "`nhwc-audit nhwc_audit.zoo.large:sd15_meta --mode fake` (reports written)",
        "cli_unet": "`nhwc-audit nhwc_audit.examples:unet --no-report --quiet`",
        "cli_unet_apply": "the same with `--apply` (its floor: the same without)",
    }
    for k, label in labels.items():
        if k in c:
            over = f"{(c[k]['median'] - c[floors[k]]['median']) * 1e3:+.0f} ms" if k in floors else ""
            lines.append(f"| {label} | {_ms(c[k])} | {over} | {c[k]['peak_rss'] / 2**20:.0f} MiB |")
    rep = r["repair"]
    lines += [
        "",
        "## Repair (`--apply`) beside the audit it follows",
        "",
        f"The bundled UNet ({rep['nodes']} nodes, {rep['steps']} rewrites kept), in one process: the audit, then",
        "`report.repaired()` (each candidate measured; the kept ones checked together, with gradients,",
        "on two inputs: in float32 against the naive conversion with the rewritten nodes in float64, in",
        "float64 whole only beyond rounding; then the rounding of the repaired model in the model's own",
        "dtype on the sample).",
        "",
        "| audit | repair | repair / audit |",
        "|---|---|---|",
        f"| {_ms(rep['audit'])} | {_ms(rep['repair'])} | {rep['repair']['median'] / rep['audit']['median']:.1f}x |",
    ]
    if "repair_maxvit" in r:
        mv = r["repair_maxvit"]
        lines += [
            "",
            f"torchvision MaxViT-T at 224x224 ({mv['nodes']} nodes, {mv['tried']} rewrites tried, {mv['steps']} kept),"
            " one round each: each rewrite is measured from its first rewritten node until the live values have the",
            "measured run's layouts again.",
            "",
            "| audit | repair | repair / audit |",
            "|---|---|---|",
            f"| {mv['audit'] * 1e3:.0f} ms | {mv['repair'] * 1e3:.0f} ms | {mv['repair'] / mv['audit']:.1f}x |",
        ]
    lines += [
        "",
        "## Scaling and per-node cost (bandwidth fixed, so no copy benchmark inside)",
        "",
        "Goal: <= 0.1 ms per node beyond the forward (the last column); the 64^2 rows of models with many",
        "nodes and little compute show it best.",
        "",
        "| case | nodes | forward | audit | audit ms per node | (audit - forward) ms per node |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["scaling"]:
        lines.append(
            f"| {row['case']} | {row['nodes']} | {_ms(row['forward'])} | {_ms(row)} | {row['ms_per_node']:.2f} | "
            f"{row['overhead_ms_per_node']:.2f} |"
        )
    lines += [
        "",
        "## Graph size (a conv and n relu/add pairs: no compute to speak of)",
        "",
        "| nodes | audit | audit us per node | analysis (findings, fixes, regions) | analysis us per node |",
        "|---|---|---|---|---|",
    ]
    for row in r["graph_size"]:
        lines.append(
            f"| {row['nodes']} | {_ms(row)} | {row['us_per_node']:.0f} | {_ms(row['analyze'])} | "
            f"{row['analyze_us_per_node']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
