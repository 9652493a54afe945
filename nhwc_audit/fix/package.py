"""The repaired GraphModule as a package a fresh process imports and runs (``--save-repaired``).

``GraphModule.to_folder`` writes the code, the weights and the submodules, and leaves out what
the code calls by a global name: a class the model returns (a dataclass of outputs), a function
fx was told not to trace (``torch.fx.wrap``), whose registration it also writes inside the
class body, where it raises. Here the package imports each such name from its module (a model
file given by path is loaded from that path, as the audit loaded it), and a name no fresh
process can import (defined inside a function, or in ``__main__``) is an error that says so.
"""

from __future__ import annotations

import builtins
import copy
import keyword
import os
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch.fx
from torch import nn
from torch.fx.graph import _custom_builtins

from ..errors import ReportWriteError
from ..prepare.copy import memory_format_for_rank
from ..prepare.load import FILE_MODULE_PREFIX

__all__ = ["package_name", "write_package", "write_parts"]

_WRAPPED = re.compile(r"^\s*torch\.fx\._symbolic_trace\.wrap\([^)]*\)\s*$", re.MULTILINE)


def write_package(gm: torch.fx.GraphModule, folder: Path, header: list[str]) -> Path:
    """Write ``gm`` to ``folder`` as a package whose ``Repaired`` class builds it, in the training
    modes its modules have, ``header`` (comment lines) first. Raises :class:`ReportWriteError`."""
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:  # annotations such as torch.Tensor print as names module.py cannot resolve
        node.type = None
    gm.recompile()
    imports = _imports(gm)
    name = package_name(folder)
    load = (
        f"from {name} import Repaired"
        if name.isidentifier()
        else f"Repaired = importlib.import_module({name!r}).Repaired"
    )
    # written beside it first and moved in whole: a save that fails half-way (a TorchScript module
    # pickles only in part) leaves nothing behind
    parent = folder.parent if str(folder.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    except OSError as e:
        raise ReportWriteError(f"cannot write {str(folder)!r}: {e.strerror or e}") from e
    try:
        gm.to_folder(staging, "Repaired")
        code = staging / "module.py"
        text = _WRAPPED.sub("", code.read_text(encoding="utf-8")).replace(f"r'{staging}/", "_HERE + r'/")
        here = "import os\n_HERE = os.path.dirname(os.path.abspath(__file__))  # loads from any working folder\n"
        lines = [*header[:1], f"# Load it: {load}", *header[1:]]
        code.write_text("\n".join(lines) + "\n" + here + imports + text + _modes_kept(gm), encoding="utf-8")
        folder.mkdir(parents=True, exist_ok=True)
        for made in staging.iterdir():
            os.replace(made, folder / made.name)
    except OSError as e:
        raise ReportWriteError(f"cannot write {str(folder)!r}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


_PARTS_INIT = '''"""{title}

Each subpackage holds one repaired part (its code). ``apply(model)`` puts each part in its module's place
in your model, with that module's weights (``load_state_dict``: your trained ones, not those the repair
saw), training modes and plain attributes, then converts the model to channels_last in place (4D tensors
channels_last, 5D channels_last_3d); it returns the model."""

import importlib

import torch

PARTS = {parts!r}
"""module path -> subpackage"""

_FORMATS = {{4: torch.channels_last, 5: torch.channels_last_3d}}


def apply(model):
    for path, sub in PARTS.items():
        old = model.get_submodule(path)
        part = importlib.import_module(f"{{__name__}}.{{sub}}").Repaired()
        part.load_state_dict(old.state_dict())
        modes = {{name: m.training for name, m in old.named_modules()}}
        for name, m in part.named_modules():
            m.training = modes.get(name, old.training)
        for key, value in vars(old).items():
            if not key.startswith("_") and key not in vars(part):
                setattr(part, key, value)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, part)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() in _FORMATS:
                t.data = t.data.to(memory_format=_FORMATS[t.dim()])
    return model
'''


def write_parts(parts: list[tuple[str, torch.fx.GraphModule]], folder: Path, header: list[str]) -> Path:
    """Write the repaired parts of a model torch.fx cannot trace as a whole (module path, graph) to
    ``folder``: one package per part (:func:`write_package`), and an ``apply(model)`` that puts them
    into the user's model. Raises :class:`ReportWriteError`."""
    package_name(folder)
    subs = {path: "part_" + path.replace(".", "_") for path, _ in parts}
    for path, gm in parts:
        write_package(gm, folder / subs[path], [*header[:1], f"# The part {path} of the model.", *header[1:]])
    title = header[0].lstrip("# ") if header else "Repaired parts"
    try:
        (folder / "__init__.py").write_text(_PARTS_INIT.format(title=title, parts=subs), encoding="utf-8")
    except OSError as e:
        raise ReportWriteError(f"cannot write {str(folder)!r}: {e.strerror or e}") from e
    return folder


def package_name(folder: Path) -> str:
    """The name ``folder`` is imported by, or :class:`ReportWriteError` when no import finds it."""
    name = folder.name
    if not name.replace("-", "_").isidentifier() or keyword.iskeyword(name):
        raise ReportWriteError(f"cannot save to {str(folder)!r}: the folder is imported as a package, name it like one")
    return name


def _imports(gm: torch.fx.GraphModule) -> str:
    """Code that binds each global name ``gm``'s code calls that ``to_folder`` does not write,
    and loads the model files (given by path) that those names and the pickled submodules
    come from."""
    known = set(_custom_builtins) | set(vars(builtins))
    lines: list[str] = []
    files: dict[str, str] = {}
    for name, obj in gm.graph.python_code(root_module="self").globals.items():
        if name in known or obj is torch:
            continue
        if isinstance(obj, types.ModuleType):
            lines.append(f"{name} = importlib.import_module({obj.__name__!r})")
            continue
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if not module or not qualname or "<locals>" in qualname or module == "__main__":
            where = "inside a function" if qualname and "<locals>" in qualname else f"in {module or 'no module'}"
            raise ReportWriteError(
                f"the repaired graph calls {name} ({qualname or obj!r}), defined {where}, which a fresh process "
                "cannot import: define it at the top level of an importable module"
            )
        _note_file(module, files)
        lines.append(f"{name} = importlib.import_module({module!r}).{qualname}")
    for m in gm.modules():  # submodules to_folder pickles: their classes' modules, loaded first
        _note_file(type(m).__module__, files)
    loads = [f"_load({mod!r}, {path!r})" for mod, path in files.items()]
    if not lines and not loads:
        return ""
    loader = _LOADER if loads else ""
    return "import importlib\n" + loader + "\n".join([*loads, *lines]) + "\n"


def _note_file(module: str, files: dict[str, str]) -> None:
    """A model file the audit loaded by its path (its module has a name no import finds)."""
    got: Any = sys.modules.get(module)
    if module.startswith(FILE_MODULE_PREFIX) and got is not None and getattr(got, "__file__", None):
        files.setdefault(module, str(got.__file__))


_LOADER = """import importlib.util
import os
import sys


def _load(name, path):  # the model's own file, loaded by its path as nhwc-audit loaded it
    if os.path.dirname(path) not in sys.path:  # with its folder importable, as then (its own imports)
        sys.path.append(os.path.dirname(path))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


"""


def _modes_kept(gm: nn.Module) -> str:
    """Code that gives every module of the saved package the training flag it has in ``gm``, and
    every parameter and buffer its memory format: ``to_folder`` builds the modules it writes out
    anew, in training mode, and unpickles the others as they were (BatchNorm would run on batch
    statistics in a model audited in eval); loading a state dict copies into NCHW tensors (the
    package ran the repaired graph NCHW); a tensor held under two names is made one tensor again."""
    mode = gm.training
    other = [name for name, m in gm.named_modules() if m.training != mode]
    formats: dict[str, str] = {}
    first: dict[int, str] = {}
    tied: dict[str, str] = {}  # a tensor held under two names (fix.contexts.keep_state): to_folder copies it
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if first.setdefault(id(t), name) != name:
            tied[name] = first[id(t)]
        fmt = memory_format_for_rank(t.dim())
        if fmt is not None and t.is_contiguous(memory_format=fmt) and not t.is_contiguous():
            formats[name] = str(fmt).removeprefix("torch.")
    return (
        "\n\n_MODE, _OTHER_MODE = " + repr((mode, tuple(other))) + "  # the modes the model was repaired in\n"
        "_FORMATS = " + repr(formats) + "  # the memory formats of its weights\n"
        "_TIED = " + repr(tied) + "  # a name of a tensor the model holds under another (one tensor)\n"
        "_built = Repaired.__init__\n\n\n"
        "def _init(self):\n"
        "    _built(self)\n"
        "    self.train(_MODE)\n"
        "    for name, module in self.named_modules():\n"
        "        if name in _OTHER_MODE:\n"
        "            module.training = not _MODE\n"
        "    held = [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]\n"
        "    for name, t in held:\n"
        "        if name in _FORMATS:\n"
        "            t.data = t.data.contiguous(memory_format=getattr(torch, _FORMATS[name]))\n"
        "    for name, other in _TIED.items():\n"
        "        path, _, leaf = name.rpartition('.')\n"
        "        held, _, key = other.rpartition('.')\n"
        "        source, owner = self.get_submodule(held), self.get_submodule(path)\n"
        "        table = '_parameters' if key in source._parameters else '_buffers'\n"
        "        getattr(owner, table)[leaf] = getattr(source, table)[key]\n\n\n"
        "Repaired.__init__ = _init\n"
    )
