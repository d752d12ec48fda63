"""Plain formatting of sizes for messages: shared by work modules and the CLI without pulling in rich."""

from __future__ import annotations

GIB = 2**30


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units, as `ls -lh` and llama.cpp's logs print them)."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.2f} {unit}"
    return f"{n / 1024:.2f} TiB"


def gib(n: float) -> str:
    """Sizes in plan messages: one decimal of GiB from 1 GiB up."""
    return human_bytes(n) if n < GIB else f"{n / GIB:.1f} GiB"
