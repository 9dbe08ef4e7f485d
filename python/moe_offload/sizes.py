"""Byte sizes as users write them ("8GiB", "512 MB", 1 << 30) and as we print them."""

from __future__ import annotations

import operator
import re
from fractions import Fraction

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
_FORMS = "write a byte count or a string like '8GiB', '512MiB' or '2.5GB'"
_SIZE = re.compile(r"^\s*(\d+)(\.\d+)?\s*([a-zA-Z]*)\s*$")

# The largest size accepted: 1 EiB, beyond any machine's memory, so a larger
# value is a typo. Every byte count derived from it fits the core's 64 bits.
MAX_BYTES = 2**60


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes in `value`: an int, or a string like "8GiB", "1.5 GB", "4096".
    Raises `MoeOffloadError` naming `what` for anything else, a negative
    size, or one above `MAX_BYTES`."""
    if isinstance(value, str):
        size = _parse_string(value, what)
    elif isinstance(value, bool) or not hasattr(value, "__index__"):
        raise MoeOffloadError(f"{what}={_shown(value)} is not a size; {_FORMS}")
    else:
        size = operator.index(value)
    if size < 0:
        raise MoeOffloadError(f"{what} must not be negative (got {size}); give the bytes to use, e.g. '8GiB'")
    if size > MAX_BYTES:
        raise MoeOffloadError(
            f"{what}={_shown(value)} is more than 1 EiB (2**60 bytes), beyond any machine's memory; "
            "give the bytes to use, e.g. '8GiB', or leave it unset for the default"
        )
    return size


def _parse_string(value: str, what: str) -> int:
    match = _SIZE.match(value)
    unit = match.group(3).lower() if match else None
    if match is None or unit not in _UNITS:
        raise MoeOffloadError(f"{what}={_shown(value)} is not a size; {_FORMS}")
    whole, fraction = match.group(1).lstrip("0"), (match.group(2) or "")[:30]
    if len(whole) > len(str(MAX_BYTES)):
        return MAX_BYTES + 1  # too large whatever the unit (and too long for int())
    # Exact arithmetic: a float would round large sizes and overflow on huge ones.
    return int(Fraction((whole or "0") + fraction) * _UNITS[unit])


def _shown(value: object) -> str:
    """`value` as an error message quotes it: its repr, shortened."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def format_size(n: float) -> str:
    """`n` bytes in binary units, e.g. "1.50 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
