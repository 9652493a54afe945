"""The module tree and the graph's groups: every op under the modules it ran in, with the same
channels_last rule as the summary, containers named, and a graph that opens small."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import AuditReport, audit
from nhwc_audit.examples import unet
from nhwc_audit.report.modules import drawn, graph_data, module_rows


def rows_of(report: AuditReport) -> list:  # type: ignore[type-arg]
    return module_rows(report.nodes, report.findings, report.regions, report.meta.modules, report.meta.model)


@pytest.fixture(scope="module")
def unet_report() -> AuditReport:
    return audit(unet, bandwidth=1e9)


def test_root_row_adds_up_to_the_summary(unet_report: AuditReport) -> None:
    rows = rows_of(unet_report)
    root = rows[0]
    s = unet_report.summary
    assert (root.path, root.name, root.type, root.depth, root.parent) == ("", "UNet", "UNet", 0, None)
    assert root.share == pytest.approx(s.channels_last_byte_share)
    assert root.finding_count == s.findings and root.moved == s.bytes_moved
    assert root.ops == sum(1 for r in unet_report.nodes if r.op not in ("placeholder", "get_attr", "output"))
    assert root.output == "softmax" and root.output_layout == "contiguous"


def test_rows_are_a_tree_in_execution_order(unet_report: AuditReport) -> None:
    rows = rows_of(unet_report)
    top = [r.path for r in rows if r.depth == 1]
    assert top == ["inc", "down1", "down2", "down3", "up1", "up2", "up3", "outc"]
    seen: set[str] = set()
    for r in rows[1:]:
        assert r.parent in seen | {""} and r.depth == r.path.count(".") + 1
        seen.add(r.path)
    by_path = {r.path: r for r in rows}
    for r in rows:  # a module's ops are its children's plus its own
        kids = [c for c in rows if c.parent == r.path]
        own = sum(1 for n in unet_report.nodes if n.module_path == r.path and n.op not in ("placeholder", "output"))
        assert r.ops >= sum(c.ops for c in kids) and r.ops - sum(c.ops for c in kids) <= own
    up3 = by_path["up3"]
    assert up3.type == "Up" and dict(up3.findings) == {"revert": 2, "mixed": 1, "conversion": 2}
    assert up3.share is not None and 0 < up3.share < 0.5  # upsample, pad and cat run NCHW
    assert by_path["down1"].share == 1.0 and by_path["down1"].findings == ()


class Stage(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.InstanceNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Blocks(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.blocks = nn.ModuleList(Stage(4) for _ in range(n))
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return x


def test_containers_are_named_and_open_while_the_graph_stays_small() -> None:
    report = audit(Blocks(3), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    assert ("blocks", "ModuleList") in report.meta.modules and ("unused", "Linear") in report.meta.modules
    rows = rows_of(report)
    by_path = {r.path: r for r in rows}
    assert "unused" not in by_path  # ran no op
    assert by_path["blocks"].type == "ModuleList" and by_path["blocks"].ops == 6
    graph = graph_data(report.nodes, report.findings, report.regions, rows)
    paths = [m["path"] for m in graph["modules"]]
    assert [paths[j] for j in graph["open"]] == ["", "blocks"]  # the container opens to its stages
    flat = {m["path"] for m in graph["modules"] if m["flat"]}
    assert {"stem", "blocks.0.conv", "blocks.0.norm"} <= flat and "blocks.0" not in flat
    big = audit(Blocks(70), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    big_graph = graph_data(big.nodes, big.findings, big.regions, rows_of(big))
    assert big_graph["open"] == [0]  # 70 stages would not be a few dozen blocks


def test_graph_draws_tensor_ops_only() -> None:
    class Padded(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.size(2)
            return torch.nn.functional.pad(x, (0, 0, 0, 16 - h))

    report = audit(Padded(), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    graph = graph_data(report.nodes, report.findings, report.regions, rows_of(report))
    names = [n["name"] for n in graph["nodes"]]
    assert names == [r.name for r in report.nodes if drawn(r)]
    assert "size" in {r.op_label for r in report.nodes} and "size" not in {n["op"] for n in graph["nodes"]}
    assert graph["nodes"][0]["op"] == "input x"


class Detector(nn.Module):
    """A head that post-processes in helper methods of its own, as torchvision's detectors do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.sigmoid()
        x = x * 2.0
        return x.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.conv(x)).softmax(-1)


def test_a_modules_helper_functions_draw_as_blocks() -> None:
    report = audit(Detector(), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    rows = rows_of(report)
    graph = graph_data(report.nodes, report.findings, report.regions, rows)
    assert graph["tree"] == len(rows)  # the tree's rows first, then the groups
    (group,) = graph["modules"][len(rows) :]
    assert (group["path"], group["name"], group["parent"], group["ops"]) == ("decode()", "decode()", 0, 4)
    assert group["tip"].splitlines()[:2] == ["decode() in Detector", "4 ops it runs itself"]
    members = [n["op"] for n in graph["nodes"] if n["module"] == len(rows)]
    assert members == ["sigmoid", "mul", "flatten", "transpose"]
    assert next(n for n in graph["nodes"] if n["op"] == "softmax")["module"] == 0  # forward's own op


class Reused(nn.Module):
    """A module called twice (torchvision's BasicBlock calls its relu twice), a helper's list
    comprehension (its own frame on Python 3.11), and a ``.view`` that breaks on channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU()

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x.sigmoid() * 2.0 for _ in range(3)]
        return torch.cat(parts, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.heads(x).view(1, -1)


def test_reused_modules_draw_at_each_call_and_breaks_are_drawn() -> None:
    report = audit(Reused(), torch.randn(1, 3, 4, 4), bandwidth=1e9, capture="hooks")
    rows = rows_of(report)
    graph = graph_data(report.nodes, report.findings, report.regions, rows)
    mods = {m["path"]: m for m in graph["modules"]}
    assert mods["act"]["flat"]  # its two calls stay two ops, no block joining them into a cycle
    assert sum(1 for n in graph["nodes"] if n["module"] == list(mods).index("act")) == 2
    assert not any("<" in p for p in mods)  # a comprehension's frame is no block: its ops stay ops
    assert {"sigmoid", "mul", "cat"} <= {n["op"] for n in graph["nodes"] if n["module"] == 0}
    (brk,) = [f for f in report.findings if f.kind.value == "break"]
    assert brk.node in {n["name"] for n in graph["nodes"]}  # the op that raised is drawn
