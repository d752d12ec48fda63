"""A pull's state on disk: the manifest of a complete pull, the journal of an unfinished one, partial-file names.

`dsv4 pull` writes them (`dsv4cli.hub.pull`); `dsv4 list`, `show`, `rm` and the GGUF lookup
(`dsv4cli.hub.gguf_repo.find_local`) only read the manifest, so they need nothing of the download machinery.
Every state file is ours but read as untrusted: bounded, regular files only, never through a symlink.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

from dsv4cli.errors import UnsafePathError
from dsv4cli.hub import api as hub
from dsv4cli.hub import safe_paths
from dsv4cli.models.local import MANIFEST_NAME, STATE_PREFIX

PARTIAL_DIR = ".dsv4-partial"
JOURNAL_NAME = "verified.jsonl"
MAX_STATE_BYTES = 64 << 20  # the manifest and journal are ours, but read as untrusted: bounded


def part_path(path: str) -> str:
    """Where a file's bytes collect until verified, relative to the target folder."""
    return f"{PARTIAL_DIR}/{path}.part"


def is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def journal(folder: Path, revision: str, remote: hub.RemoteFile, lock: threading.Lock) -> None:
    line = json.dumps({"revision": revision, "path": remote.path, "size": remote.size, "sha256": remote.sha256})
    with lock, safe_paths.open_file(folder, f"{PARTIAL_DIR}/{JOURNAL_NAME}", "ab") as f:
        f.write(line.encode() + b"\n")


def read_state(folder: Path, rel: str) -> str:
    """One of our state files, or "" when it is missing, unreadable, too big or not a regular file."""
    try:
        with safe_paths.open_file(folder, rel, "rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
    except (OSError, UnsafePathError):
        return ""
    return data.decode("utf-8", errors="replace") if len(data) <= MAX_STATE_BYTES else ""


def known_verified(folder: Path, revision: str) -> dict[str, dict[str, Any]]:
    """Files verified earlier at this revision: the manifest, plus the journal of an unfinished pull."""
    manifest = read_manifest(folder)
    known = dict(manifest["files"]) if manifest.get("revision") == revision else {}
    for line in read_state(folder, f"{PARTIAL_DIR}/{JOURNAL_NAME}").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(record, dict) and record.get("revision") == revision and isinstance(record.get("path"), str):
            known[record["path"]] = record
    return {path: record for path, record in known.items() if isinstance(record, dict)}


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a complete pull, or {} when there is none or it is unreadable, nested too deeply, or names
    a file that is not a safe relative path below the folder (`../another-model/x`, dsv4's own state files)."""
    try:
        data = json.loads(read_state(folder, MANIFEST_NAME) or "{}")
    except (json.JSONDecodeError, RecursionError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return {}
    unsafe = any(safe_paths.name_problem(p) or p.startswith(STATE_PREFIX) for p in data["files"])
    return {} if unsafe else data


def write_manifest(folder: Path, listing: hub.RepoListing, selected: list[hub.RemoteFile]) -> None:
    """Record every verified file (keeping earlier entries of the same commit), atomically; tidy the partial dir."""
    old = read_manifest(folder)
    files = dict(old["files"]) if old.get("revision") == listing.revision else {}
    for remote in selected:
        sha256 = remote.sha256 or hub.hash_file(folder, remote.path, remote).sha256.hexdigest()
        files[remote.path] = {"size": remote.size, "sha256": sha256}
    store_manifest(folder, {"repo": listing.repo, "revision": listing.revision, "files": dict(sorted(files.items()))})
    safe_paths.unlink(folder, f"{PARTIAL_DIR}/{JOURNAL_NAME}")
    partial = folder / PARTIAL_DIR
    if is_real_dir(partial) and not any(p.is_file() for p in partial.rglob("*")):  # keep parts of unselected files
        shutil.rmtree(partial)


def store_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = f"{MANIFEST_NAME}.tmp"
    with safe_paths.open_file(folder, tmp, "wb") as f:
        f.write((json.dumps(manifest, indent=2) + "\n").encode())
    safe_paths.replace(folder, tmp, MANIFEST_NAME)


def forget_files(folder: Path, paths: list[str]) -> None:
    """Drop files being removed (`dsv4 rm`) from the manifest, under the caller's folder lock; with none left
    the manifest goes too, so the folder no longer counts as a pull."""
    manifest = read_manifest(folder)
    files = {p: entry for p, entry in manifest.get("files", {}).items() if p not in set(paths)}
    if files:
        store_manifest(folder, {**manifest, "files": files})
    else:
        safe_paths.unlink(folder, MANIFEST_NAME)
