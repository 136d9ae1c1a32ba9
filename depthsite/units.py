"""Human-readable byte sizes: parsing ("10GB", "512MiB") and formatting ("1.3 GB")."""
from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'10GB' -> 10_000_000_000; '1.5GiB', '800M', '123' also accepted. ValueError when unreadable."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 10GB, 500MB, 2GiB, 123456)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(num_bytes: int | None) -> str:
    """1_340_000_000 -> '1.34 GB'; decimal units, as disks and downloads are labelled."""
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            break
        value /= 1000
    else:  # pragma: no cover - the loop always breaks
        unit = "GB"
    if unit == "B":
        return f"{int(value)} B"
    if unit == "GB" and abs(value) >= 1000:
        return f"{value / 1000:.2f} TB"
    return f"{value:.2f} {unit}" if unit == "GB" else f"{value:.1f} {unit}"


def iso_time(value) -> str | None:
    """A datetime as ISO 8601 text for JSON answers; None stays None."""
    return value.isoformat() if value else None
