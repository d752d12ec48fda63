"""The last lines of a build or server log, for one-line error messages."""

from __future__ import annotations

import contextlib
from collections import deque
from pathlib import Path


def log_tail(path: Path, n: int = 6) -> str:
    """The last `n` non-empty lines of `path` joined with ` | ` (empty when it cannot be read)."""
    with contextlib.suppress(OSError), path.open(errors="replace") as f:
        return " | ".join(line.strip() for line in deque(f, maxlen=n) if line.strip())
    return ""
