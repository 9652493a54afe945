from __future__ import annotations

import subprocess
import sys

import nhwc_audit


def test_all_is_sorted_and_matches_exports() -> None:
    assert nhwc_audit.__all__ == sorted(nhwc_audit.__all__)
    public = {n for n in dir(nhwc_audit) if not n.startswith("_") and not isinstance(getattr(nhwc_audit, n), type(sys))}
    assert public - {"annotations", "TYPE_CHECKING", "Any"} == set(nhwc_audit.__all__)


def test_cli_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys; from nhwc_audit.cli import main; main(['--help']); "
        "print(sorted(m for m in ('torch', 'networkx', 'rich', 'jinja2', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
