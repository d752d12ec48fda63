"""Rich rendering shared by the commands: consoles, byte progress bars, JSON output.

Results go to stdout; progress, notes and errors go to stderr so `--json` output stays clean.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}  # controls (ESC, CSI, BEL), bidi overrides, line separators
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def byte_progress(*, transient: bool = False) -> Progress:
    """A progress display for byte counts: bar, done/total, rate and ETA (stderr)."""
    return Progress(
        TextColumn("[bold]{task.description}", table_column=None),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=not err.is_terminal and os.environ.get("DSV4_PROGRESS") != "1",  # =1: in a pipe too
    )


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def note(message: str) -> None:
    """A line on stderr, printed literally: model output and paths may contain rich markup like `[b]`."""
    err.print(message, markup=False)


def printable(text: object, *, keep: str = "", limit: int | None = None) -> str:
    """`text` from a stranger (a file name, host, model name, server error, model output) made safe for a
    terminal: every control or format character (ESC of an escape sequence, CSI, BEL, bidi overrides) is shown
    escaped (`\\x1b`), except those in `keep` (the REPL keeps "\\n\\t"); cut to `limit` characters."""
    value = os.fsdecode(text) if isinstance(text, (str, bytes, os.PathLike)) else str(text)
    if limit is not None and len(value) > limit:
        value = value[: max(limit - 3, 0)] + "..."
    if value.isprintable():
        return value
    return "".join(
        c.encode("unicode_escape").decode("ascii") if c not in keep and unicodedata.category(c) in _UNPRINTABLE else c
        for c in value
    )
