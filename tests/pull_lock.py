"""A second process holding a folder's pull lock, as a running `dsv4 pull` does (for the `rm` tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

HOLDER = (
    "import sys; from pathlib import Path; from dsv4cli.hub import safe_paths\n"
    "with safe_paths.folder_lock(Path(sys.argv[1]), '.dsv4-pull.lock', what='pull', on_wait=print):\n"
    "    print('locked', flush=True); sys.stdin.readline()"
)


def hold_pull_lock(python: str, folder: Path) -> subprocess.Popen[str]:
    """A child that holds `folder`'s pull lock until a line is written to its stdin (`.communicate("\\n")`)."""
    holder = subprocess.Popen(
        [python, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder
