"""Plain-text formatting helpers shared by the console summary, errors and reports."""

from __future__ import annotations

import os

__all__ = ["fmt_bytes", "fmt_seconds", "fmt_share", "short_path"]


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (decimal units).

    >>> fmt_bytes(8_400_000)
    '8.4 MB'
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float) -> str:
    """Human-readable duration.

    >>> fmt_seconds(0.00042)
    '420.0 us'
    >>> fmt_seconds(0.0042)
    '4.20 ms'
    """
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_share(x: float) -> str:
    """A share as a percentage.

    >>> fmt_share(0.875)
    '87.5%'
    """
    return f"{100 * x:.1f}%"


def short_path(file: str, cwd: str | None = None) -> str:
    """A source path relative to the working directory, or to site-packages.

    >>> short_path("/x/lib/python3.11/site-packages/timm/models/vit.py", cwd="/home")
    'timm/models/vit.py'
    """
    base = cwd or os.getcwd()
    try:
        rel = os.path.relpath(file, base)
        if not rel.startswith(".."):
            return rel
    except ValueError:
        pass
    marker = "site-packages" + os.sep
    if marker in file:
        return file.split(marker, 1)[1]
    return file
