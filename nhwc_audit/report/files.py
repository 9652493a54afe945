"""Report files on disk: written atomically (a temporary file in the same folder, then a
rename), so a reader never sees half a report and an interrupted run leaves the old one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ReportWriteError

__all__ = ["write_text_atomic"]


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ReportWriteError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ReportWriteError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; reports are ordinary files
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ReportWriteError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
        raise
    return path
