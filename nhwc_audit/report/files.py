"""Report files on disk: written atomically (a temporary file in the same folder, then a
rename), so a reader never sees half a report and an interrupted run leaves the old one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import ReportWriteError

__all__ = ["write_all_atomic", "write_text_atomic"]


def _stage(path: Path, text: str) -> str:
    """``text`` in a temporary file beside ``path`` (same folder: the rename is atomic)."""
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
    except BaseException as e:
        _discard([tmp])
        if isinstance(e, OSError):
            raise ReportWriteError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
        raise
    return tmp


def _discard(tmps: list[str]) -> None:
    for tmp in tmps:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def write_all_atomic(files: list[tuple[Path, str]], *, make_folders: bool = True) -> list[Path]:
    """Write every ``(path, text)`` or none: all are staged in temporary files first (folders
    made when ``make_folders``), then renamed into place, each file they replace kept aside until
    all are in (and put back if one fails); a folder where a file goes fails first, named."""
    for path, _ in files:
        if path.is_dir():
            raise ReportWriteError(f"cannot write {str(path)!r}: it is a folder")
    staged: list[str] = []
    placed: list[tuple[Path, str | None]] = []  # (target, what it held, set aside)
    try:
        for path, text in files:
            if make_folders and str(path.parent):
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ReportWriteError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
            staged.append(_stage(path, text))
        for tmp, (path, _) in zip(staged, files, strict=True):
            try:
                kept = _stage(path, "") if path.exists() else None
                if kept is not None:
                    os.replace(path, kept)
                placed.append((path, kept))
                os.replace(tmp, path)
            except OSError as e:
                raise ReportWriteError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    except BaseException:
        for path, kept in reversed(placed):  # put back what was there
            with contextlib.suppress(OSError):
                if kept is not None:
                    os.replace(kept, path)
                else:
                    os.unlink(path)
        _discard(staged)
        raise
    _discard([kept for _, kept in placed if kept is not None])
    return [path for path, _ in files]


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder (made as needed,
    as the CLI makes its report folders)."""
    write_all_atomic([(path, text)])
    return path
