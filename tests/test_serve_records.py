"""The records `dsv4 serve` keeps of what it serves: written whole, read back while alive, stale ones ignored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dsv4cli.server.records import remove_record, run_dir, running_servers, write_record


def test_record_lists_the_files_while_the_process_lives(tmp_path: Path) -> None:
    shard = tmp_path / "m-00001-of-00002.gguf"
    path = write_record([shard, tmp_path / "m-00002-of-00002.gguf"], url="http://127.0.0.1:9/v1", model="m")
    assert path.parent == run_dir() and not list(run_dir().glob(".*"))  # no temporary file left
    (record,) = running_servers()
    assert record["files"] == [str(shard.resolve()), str((tmp_path / "m-00002-of-00002.gguf").resolve())]
    assert record["url"] == "http://127.0.0.1:9/v1" and record["model"] == "m"
    remove_record(path)
    remove_record(path)  # twice is fine: a stop after a failed start
    assert running_servers() == []


def test_stale_and_malformed_records_are_ignored() -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    folder = run_dir()
    folder.mkdir(parents=True)
    (folder / f"serve-{pid}.json").write_text(json.dumps({"pid": pid, "files": ["/m.gguf"], "url": "", "model": ""}))
    (folder / "serve-1.json").write_text("{not json")
    (folder / "serve-2.json").write_text(json.dumps({"pid": "2", "files": "/m.gguf"}))
    (folder / "serve-abc.json").write_text(json.dumps({"pid": 1, "files": []}))  # pid 1 lives, name does not match
    assert running_servers() == []
