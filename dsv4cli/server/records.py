"""What each running `dsv4 serve` holds, so `dsv4 rm` can refuse to delete a model a server is using.

While it runs, serve keeps `$DSV4_HOME/run/serve-<pid>.json` = {"pid", "started" (the process's start time),
"files" (absolute GGUF paths, every shard), "url", "model"}, written under a temporary name and renamed, and
removed when it stops. A serve killed outright leaves its record behind (its llama-server dies with it, see
`process.py`): a record whose pid is no longer alive, or now belongs to another process (the pid was reused: its
start time differs), is stale, and readers skip it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import psutil

from dsv4cli.atomic import write_text_atomic
from dsv4cli.home import dsv4_home
from quant.errors import CheckpointError
from quant.files import load_json_object

RECORD_LIMIT = 1 << 20  # a record names a few shard paths; anything larger is not ours


def run_dir() -> Path:
    return dsv4_home() / "run"


def write_record(files: list[Path], *, url: str, model: str) -> Path:
    """Record that this process serves `files`; returns the record's path for `remove_record`."""
    folder = run_dir()
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    started = psutil.Process(pid).create_time()
    record = {
        "pid": pid,
        "started": started,
        "files": [str(Path(f).resolve()) for f in files],
        "url": url,
        "model": model,
    }
    path = folder / f"serve-{pid}.json"
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def remove_record(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def running_servers() -> list[dict[str, Any]]:
    """The records of the serve processes alive now (stale and malformed records are skipped)."""
    folder = run_dir()
    if not folder.is_dir():
        return []
    alive = []
    for path in sorted(folder.glob("serve-*.json")):
        try:
            record = load_json_object(path, limit=RECORD_LIMIT)
        except CheckpointError:
            continue  # removed while we listed, or not a record
        pid, files = record.get("pid"), record.get("files")
        if not isinstance(pid, int) or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            continue
        started = record.get("started")
        if path.stem == f"serve-{pid}" and pid > 0 and isinstance(started, float) and _started(pid) == started:
            alive.append(record)
    return alive


def _started(pid: int) -> float | None:
    """The start time of process `pid` (what `write_record` stored), None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None
