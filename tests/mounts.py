"""Small real filesystems for the tests that need a full or read-only disk (tmpfs, mounted as root)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(mount: Path, size: int, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` bytes at `mount` (created), or a skip where this machine cannot mount one."""
    mount.mkdir()
    options = f"{'ro,' if read_only else ''}size={size}"
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, capture_output=True)
