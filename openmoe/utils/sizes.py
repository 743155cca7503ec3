"""Sizes given as text, like "5GB", "500MB", "24GiB": the one parser behind --max-shard-size
(the converter, distributed export) and --device_memory (the planner)."""

from __future__ import annotations

import re

# HF's convention: KB/MB/GB/TB are powers of ten, KiB/MiB/GiB/TiB powers of two; a bare K/M/G/T is a
# power of ten, no unit is bytes
UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40, "k": 10 ** 3, "m": 10 ** 6,
         "g": 10 ** 9, "t": 10 ** 12}
_SIZE = re.compile(r"\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes, > 0: '80GB' -> 80e9, '24GiB' -> 24 * 2^30, '1.5TB', '512MiB', '123'; an int is taken
    as bytes. ValueError naming the text otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m or m.group(2).lower() not in UNITS:
            raise ValueError(f"{text!r}: expected a size like 80GB, 24GiB or 512MiB")
        value = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{text!r}: must be > 0")
    return value
