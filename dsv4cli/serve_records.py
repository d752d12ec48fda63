"""Which GGUFs a running `dsv4 serve` holds, from the records it writes while it runs:
`$DSV4_HOME/run/serve-<pid>.json` = {"pid": int, "files": [absolute GGUF paths], "url": str, "model": str}.

A small reader for `dsv4 rm` until serve's own `running_servers()` lands; a record whose pid is dead is stale
(a killed server cannot remove it) and is ignored. Records are untrusted: bounded, and malformed ones skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psutil

from dsv4cli.home import dsv4_home

MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerRecord:
    pid: int
    files: tuple[Path, ...]
    url: str
    model: str


def running_servers() -> list[ServerRecord]:
    """The records of servers still running (live pid), in file-name order."""
    records = []
    for path in sorted((dsv4_home() / "run").glob("serve-*.json")):
        try:
            if path.is_symlink() or path.stat().st_size > MAX_RECORD_BYTES:
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            record = ServerRecord(
                int(data["pid"]), tuple(Path(f) for f in data["files"]), str(data["url"]), str(data["model"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if record.pid > 0 and psutil.pid_exists(record.pid):
            records.append(record)
    return records
