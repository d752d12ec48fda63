"""Rich rendering shared by the commands: consoles, byte progress bars, JSON output.

Results go to stdout; progress, notes and errors go to stderr so `--json` output stays clean.
"""

from __future__ import annotations

import json
import os
import sys
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
