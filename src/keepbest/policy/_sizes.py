"""Sizes in bytes: parsed from what a user types (``"50GB"``, ``"1.5 GiB"``) and printed back.

Example:
    >>> parse_size("50GB"), parse_size("1.5 GiB"), parse_size("500MB"), parse_size(1024)
    (50000000000, 1610612736, 500000000, 1024)
    >>> format_size(50_000_000_000), format_size(999), format_size(1_610_612_736)
    ('50.0 GB', '999 B', '1.6 GB')
"""

from __future__ import annotations

import math
import re

# Decimal units are powers of 1000 (as disks are sold), the "i" units powers of 1024.
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([a-z]*)\s*", re.I)


def parse_size(value: int | str, name: str = "max_bytes") -> int:
    """A number of bytes from an int or a string like ``"50GB"``, ``"1.5 GiB"``, ``"500MB"`` or ``"1024"``.

    Raises:
        ValueError: for anything else (a negative, zero or fractional byte count, an unknown unit).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)) and m.group(3).upper() in UNITS:
        exact = float(m.group(1)) * 10 ** int(m.group(2) or 0) * UNITS[m.group(3).upper()]
        n = round(exact) if math.isfinite(exact) and abs(exact - round(exact)) < 1e-6 * max(1.0, exact) else -1
    else:
        raise ValueError(f"{name} must be a number of bytes: an int, or a string such as '50GB', '1.5 GiB' or "
                         "'500MB' (units B, kB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB; case does not matter). "
                         f"Received: {name}={value!r}")
    if n < 1:
        raise ValueError(f"{name} must be a positive whole number of bytes, e.g. 50_000_000_000 or '50GB'. "
                         f"Received: {name}={value!r}")
    return n


def format_size(n: float) -> str:
    """``n`` bytes in decimal units, one decimal: ``"50.0 GB"``; huge values stay short (``"1.0e+18 TB"``)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    n /= 1000
    return f"{n:.1f} TB" if n < 1e6 else f"{n:.1e} TB"
