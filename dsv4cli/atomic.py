"""Small files written whole or not at all: a unique temporary name beside the target, then a rename.

Used for plan files (`dsv4 plan -o`), saved conversations (`/save`), serve's run records and the machine cache
(`machine.json`): a full disk or a kill mid-write leaves the previous file intact, and two writers at once never
interleave (the last rename wins, complete).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically; OSError (ENOSPC, EACCES, ...) leaves no temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
