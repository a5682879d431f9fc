"""Byte sizes for people (kept free of heavy imports: `desktune plan` answers without loading torch)."""

from __future__ import annotations

import re

# GB/MB count powers of 1000 and GiB/MiB powers of 1024, as disks and memory specs write them; a bare letter
# (24G, as `free -g` and `ls -h` print it) is the binary unit. A number without a unit is refused, never bytes.
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
              "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
SIZE_HELP = "24GB = 24 x 10^9 bytes, 24GiB = 24G = 24 x 2^30 bytes; also B, KB, MB, TB, KiB, MiB, TiB"
MAX_SIZE = 2**50  # 1 PiB: more than any one machine's memory, so a larger size is a typo


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _shown(text: str) -> str:
    """The user's text as an error quotes it: at most 40 characters."""
    return text if len(text) <= 40 else f"{text[:37]}..."


def parse_size(text: str) -> int:
    """'24GB' -> 24 * 10**9 bytes, '8GiB' / '8G' -> 8 * 2**30; ValueError for anything else.

    Refused, with the units in the message: no unit ('24'), an unknown unit, zero or negative, over 1 PiB.
    """
    if len(text) > 40:  # no size is longer, and the pattern below backtracks in quadratic time on long digit runs
        raise ValueError(f"'{_shown(text)}' is not a size ({SIZE_HELP})")
    m = re.fullmatch(r"\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"'{_shown(text)}' is not a size; write a number and a unit ({SIZE_HELP})")
    number, unit = float(m.group(1)), m.group(2).lower()
    if not unit:
        n = m.group(1)
        raise ValueError(f"'{_shown(text)}' has no unit: {n}GB is {n} x 10^9 bytes, {n}GiB (or {n}G) {n} x 2^30")
    if unit not in SIZE_UNITS:
        raise ValueError(f"'{_shown(text)}': unknown unit '{_shown(m.group(2))}' ({SIZE_HELP})")
    size = number * SIZE_UNITS[unit]
    if not size > 0:
        raise ValueError(f"'{_shown(text)}' is not a positive size ({SIZE_HELP})")
    if size > MAX_SIZE:
        raise ValueError(f"'{_shown(text)}' is more than 1 PiB, more than any machine has ({SIZE_HELP})")
    return max(1, int(size))
