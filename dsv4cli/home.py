"""Where dsv4 keeps downloads and outputs: `$DSV4_HOME`, default `~/.cache/dsv4`."""

from __future__ import annotations

import os
from pathlib import Path


def dsv4_home() -> Path:
    return Path(os.environ.get("DSV4_HOME") or Path.home() / ".cache" / "dsv4").expanduser()


def models_dir() -> Path:
    """Checkpoints pulled by `dsv4 pull`, one folder per registry name (or `org--name`)."""
    return dsv4_home() / "models"


def gguf_dir() -> Path:
    """GGUFs written by `dsv4 quantize` when no `-o` is given."""
    return dsv4_home() / "gguf"
