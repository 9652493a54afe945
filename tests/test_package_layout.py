"""The package layout is the pipeline: imports point down it, never up, with no cycle and no
private name crossing modules (docs/ARCHITECTURE.md draws the same order)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PKG = Path(__file__).resolve().parents[1] / "nhwc_audit"

RANK = {
    "records": 0,
    "collector": 0,
    "errors": 0,
    "layout": 1,
    "channels": 1,
    "dtypes": 1,
    "tensors": 1,
    "capture": 2,
    "prepare": 2,
    "propagate": 3,
    "analyze": 4,
    "fix": 5,
    "timing": 5,
    "report": 6,
    "followups": 6,
    "result": 7,
    "refine": 8,
    "pipeline": 8,
    "api": 9,
    "zoo": 10,
    "testing": 10,
    "pytest_plugin": 10,
    "integrations": 10,
    "cli": 11,
    "examples": 1,
}
"""The pipeline's order: a module imports its own stage and the stages below it."""

UPWARD_ALLOWED: set[tuple[str, str]] = set()
"""Stage pairs allowed to import upwards: none."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(imported module, names, under TYPE_CHECKING) for every package-internal import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            if node.module is None:  # from . import x: a submodule, or a name of the package
                folder = PKG.parent.joinpath(*target.split("."))
                for n in names:
                    is_module = (folder / f"{n}.py").exists() or (folder / n).is_dir()
                    out.append(
                        (f"{target}.{n}" if is_module else target, [] if is_module else [n], id(node) in typing_only)
                    )
            else:
                out.append((target, names, id(node) in typing_only))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nhwc_audit"):
            out.append((node.module or "", [a.name for a in node.names], id(node) in typing_only))
    return out


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _all_imports() -> list[tuple[str, str, list[str], bool]]:
    rows = []
    for path in sorted(PKG.rglob("*.py")):
        src = _module_name(path)
        for target, names, typing_only in _imports(path):
            rows.append((src, target, names, typing_only))
    return rows


def test_every_stage_has_a_rank() -> None:
    stages = {p.stem if p.is_file() else p.name for p in PKG.iterdir() if p.suffix == ".py" or p.is_dir()}
    stages -= {"__init__", "__main__", "__pycache__", "templates"}
    assert stages <= set(RANK), f"stages without a rank: {sorted(stages - set(RANK))}"


def test_imports_point_down_the_pipeline() -> None:
    up = []
    for src, target, _, typing_only in _all_imports():
        a, b = _stage(src), _stage(target)
        if typing_only or a in ("__init__", "__main__") or b == "__init__":
            continue
        if RANK[b] > RANK[a] and (a, b) not in UPWARD_ALLOWED:
            up.append(f"{src} -> {target}")
    assert up == []


def test_no_import_cycle_between_modules() -> None:
    g: nx.DiGraph[str] = nx.DiGraph()
    for src, target, _, typing_only in _all_imports():
        if not typing_only and src != target:
            g.add_edge(src, target)
    assert list(nx.simple_cycles(g)) == []


def test_no_private_name_crosses_modules() -> None:
    crossing = [
        f"{src} imports {name} from {target}"
        for src, target, names, _ in _all_imports()
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert crossing == []


def test_every_stage_says_what_comes_in_and_goes_out() -> None:
    for init in sorted(PKG.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"{init.parent.name}/__init__.py needs a docstring (in, out, what it holds)"


def test_no_module_is_over_320_lines() -> None:
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 320}
    assert long == {}
