"""Byte sizes as users write them ("8GiB", "512 MB", 1 << 30) and as we print them."""

from __future__ import annotations

import re

from moe_offload._core import MoeOffloadError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes in `value`: an int, or a string like "8GiB", "1.5 GB", "4096"."""
    if isinstance(value, bool):
        raise MoeOffloadError(f"{what} must be a byte count or a size string like '8GiB', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise MoeOffloadError(f"{what} must not be negative (got {value})")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match and unit in _UNITS:
            return int(float(match.group(1)) * _UNITS[unit])
    raise MoeOffloadError(
        f"{what}={value!r} is not a size; write a byte count or a string like '8GiB', '512MiB' or '2.5GB'"
    )


def format_size(n: float) -> str:
    """`n` bytes in binary units, e.g. "1.50 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
