"""`dsv4 pull`: get a checkpoint onto disk, complete and verified, resumable after any interruption.

Hub models: list the repo (sizes, LFS sha256), decide per file what is left, check free disk, then download
in parallel (dsv4cli.hub does the bytes). A file reaches its final path only after its hash matched; the
manifest (dsv4cli.local.MANIFEST_NAME) is written only after every selected file did. Built-in models are
written offline by dsv4cli.tiny and get the same manifest.

State on disk, per target folder:
    <dir>/<file>                      verified files only
    <dir>/.dsv4-partial/<file>.part   bytes received so far (resumed with HTTP Range)
    <dir>/.dsv4-partial/verified.jsonl  files verified by an unfinished pull (so a rerun does not re-hash them)
    <dir>/.dsv4-pull.json             the manifest: repo, commit, {path: {size, sha256}}
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dsv4cli import hub
from dsv4cli.errors import DiskSpaceError, DownloadError, IntegrityError, UsageError
from dsv4cli.local import MANIFEST_NAME, checkpoint_state
from dsv4cli.registry import ModelSpec, get_model
from dsv4cli.units import human_bytes

PARTIAL_DIR = ".dsv4-partial"
JOURNAL_NAME = "verified.jsonl"
BUILTIN_REVISION = "builtin"


@dataclass(frozen=True)
class PullOptions:
    revision: str | None = None  # default: the registry's pinned revision
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    folder: Path | None = None  # default: spec.local_dir
    workers: int = 4
    dry_run: bool = False
    verify: bool = False


@dataclass
class FileState:
    """One selected file. status: verified | present (unhashed) | partial | missing | downloaded | mismatch."""

    path: str
    size: int
    status: str
    have_bytes: int = 0


@dataclass
class PullResult:
    """What a pull, dry run or verify found and did; `files` holds each selected file's final state."""

    model: str
    repo: str | None
    revision: str
    folder: Path
    mode: str  # pull | dry-run | verify
    builtin: bool
    files: list[FileState]
    total_bytes: int
    remaining_bytes: int
    free_bytes: int
    downloaded_bytes: int = 0
    seconds: float = 0.0
    verified: int = 0
    refetched: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["folder"] = str(self.folder)
        return data


class PullProgress(Protocol):
    """What `pull` reports while it works; the CLI draws it, tests may ignore it."""

    def start(self, total_bytes: int) -> None: ...
    def file_started(self, path: str, size: int, *, action: str) -> None: ...
    def advance(self, path: str, delta: int) -> None: ...
    def file_done(self, path: str) -> None: ...
    def note(self, message: str) -> None: ...


class _Silent:
    def start(self, total_bytes: int) -> None:
        pass

    def file_started(self, path: str, size: int, *, action: str) -> None:
        pass

    def advance(self, path: str, delta: int) -> None:
        pass

    def file_done(self, path: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def pull(name: str, options: PullOptions, *, progress: PullProgress | None = None) -> PullResult:
    """Download (or write, for built-in models) `name` into its folder and verify every file.

    Raises:
        UnknownModelError, NotFoundOnHubError, AuthError: bad name, repo, revision or access.
        DiskSpaceError: free disk below what remains to download (nothing is started).
        DownloadError: network failure after retries (partial files are kept for resume).
        IntegrityError: a file still mismatches the Hub after being fetched again.
    """
    if options.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {options.workers}")
    spec = get_model(name)
    folder = (options.folder or spec.local_dir).expanduser().resolve()
    progress = progress or _Silent()
    started = time.monotonic()
    if spec.builtin and not (options.dry_run or options.verify):
        _write_builtin(spec, folder)
    listing = _listing(spec, options, folder)
    selected = _select(listing, options)
    states = _assess(folder, listing, selected)
    result = PullResult(
        model=spec.name,
        repo=spec.repo,
        revision=listing.revision,
        folder=folder,
        mode="dry-run" if options.dry_run else "verify" if options.verify else "pull",
        builtin=spec.builtin,
        files=list(states.values()),
        total_bytes=sum(f.size for f in selected),
        remaining_bytes=sum(s.size - s.have_bytes for s in states.values() if s.status in ("partial", "missing")),
        free_bytes=shutil.disk_usage(_existing_parent(folder)).free,
    )
    if options.dry_run:
        return result
    remotes = {f.path: f for f in selected}
    if options.verify:
        _verify(folder, remotes, states, result, workers=options.workers, progress=progress)
    else:
        if result.remaining_bytes > result.free_bytes:
            raise DiskSpaceError(
                f"not enough free disk in {folder}: {human_bytes(result.remaining_bytes)} "
                f"({result.remaining_bytes} bytes) left to download, {human_bytes(result.free_bytes)} "
                f"({result.free_bytes} bytes) free",
                hint="free some space or pass --dir on a bigger disk",
            )
        todo = [remotes[p] for p, s in states.items() if s.status != "verified"]
        if todo and hub.offline():
            raise DownloadError(
                f"HF_HUB_OFFLINE is set and {len(todo)} file(s) of {spec.repo} are not on disk in {folder}",
                hint="unset HF_HUB_OFFLINE to download them",
            )
        _download(folder, listing, todo, states, result, workers=options.workers, progress=progress)
        _write_manifest(folder, listing, selected)
    result.seconds = time.monotonic() - started
    result.verified = sum(s.status in ("verified", "downloaded") for s in states.values())
    return result


def _write_builtin(spec: ModelSpec, folder: Path) -> None:
    """Write a built-in checkpoint offline and record it in a manifest, unless a complete one is there."""
    if read_manifest(folder).get("revision") == BUILTIN_REVISION:
        return
    # The writer replaces the whole folder: only a folder we wrote (manifest or partial dir) may be non-empty.
    if checkpoint_state(folder) == "partial" and not (folder / PARTIAL_DIR).is_dir():
        raise UsageError(f"{folder} is not empty and was not written by `dsv4 pull`", hint="pass an empty --dir")
    from dsv4cli.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(spec, folder)
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(folder).as_posix()
        hasher = hub.hash_file(path, hub.RemoteFile(rel, path.stat().st_size))
        files.append(hub.RemoteFile(rel, hasher.size, sha256=hasher.sha256.hexdigest()))
    listing = hub.RepoListing(repo=f"builtin:{spec.name}", revision=BUILTIN_REVISION, files=tuple(files))
    _write_manifest(folder, listing, files)


def _listing(spec: ModelSpec, options: PullOptions, folder: Path) -> hub.RepoListing:
    """The Hub's file list; the manifest stands in for it for built-in models and under HF_HUB_OFFLINE."""
    manifest = read_manifest(folder)
    if spec.builtin and not manifest and options.dry_run:  # list what would be written: write it aside
        with tempfile.TemporaryDirectory() as tmp:
            _write_builtin(spec, Path(tmp) / spec.name)
            manifest = read_manifest(Path(tmp) / spec.name)
    if spec.builtin or hub.offline():
        if not manifest:
            what = "was never written there" if spec.builtin else "has no complete pull there"
            raise DownloadError(
                f"{spec.name} {what} ({folder}) and the Hub cannot be asked",
                hint=f"run `dsv4 pull {spec.name}`" if spec.builtin else "unset HF_HUB_OFFLINE",
            )
        files = tuple(
            hub.RemoteFile(path, entry["size"], sha256=entry["sha256"]) for path, entry in manifest["files"].items()
        )
        return hub.RepoListing(repo=manifest["repo"], revision=manifest["revision"], files=files)
    assert spec.repo is not None
    return hub.list_repo(spec.repo, options.revision or spec.revision)


def _select(listing: hub.RepoListing, options: PullOptions) -> list[hub.RemoteFile]:
    from huggingface_hub.utils import filter_repo_objects

    selected = list(
        filter_repo_objects(
            listing.files,
            allow_patterns=list(options.include) or None,
            ignore_patterns=list(options.exclude) or None,
            key=lambda f: f.path,
        )
    )
    if not selected:
        raise UsageError(
            f"no file of {listing.repo} matches --include {list(options.include)} --exclude {list(options.exclude)}",
            hint="patterns are globs on repo paths, e.g. --include '*.json'",
        )
    return selected


def _assess(folder: Path, listing: hub.RepoListing, selected: list[hub.RemoteFile]) -> dict[str, FileState]:
    """What each selected file needs: nothing (verified), a hash (present), the rest of it, or all of it."""
    known = _known_verified(folder, listing.revision)
    states = {}
    for remote in selected:
        final = folder / remote.path
        part = _part_path(folder, remote.path)
        if final.is_file() and final.stat().st_size == remote.size:
            record = known.get(remote.path, {})
            trusted = record.get("size") == remote.size and (not remote.sha256 or record.get("sha256") == remote.sha256)
            states[remote.path] = FileState(remote.path, remote.size, "verified" if trusted else "present", remote.size)
        elif part.is_file():
            states[remote.path] = FileState(remote.path, remote.size, "partial", min(part.stat().st_size, remote.size))
        else:
            states[remote.path] = FileState(remote.path, remote.size, "missing")
    return states


def _verify(
    folder: Path,
    remotes: dict[str, hub.RemoteFile],
    states: dict[str, FileState],
    result: PullResult,
    *,
    workers: int,
    progress: PullProgress,
) -> None:
    """Re-hash every selected file on disk; download nothing. Missing files count as mismatches."""

    def check(remote: hub.RemoteFile) -> None:
        state = states[remote.path]
        final = folder / remote.path
        if not final.is_file():
            state.status = "mismatch"
            progress.note(f"{remote.path}: missing")
            return
        why = _check_on_disk(final, remote, progress, action="hash")
        state.status = "mismatch" if why else "verified"
        if why:
            progress.note(f"{remote.path}: does not match the Hub ({why})")

    progress.start(sum(r.size for r in remotes.values() if (folder / r.path).is_file()))
    _run_parallel(check, list(remotes.values()), workers=workers, stop=threading.Event())
    result.mismatched = sorted(p for p, s in states.items() if s.status == "mismatch")
    if result.mismatched and (folder / MANIFEST_NAME).is_file():
        # No longer complete: keep what verified in the journal so the next pull fetches only the bad files.
        lock = threading.Lock()
        for path, state in states.items():
            if state.status == "verified":
                _journal(_journal_path(folder), result.revision, remotes[path], lock)
        (folder / MANIFEST_NAME).unlink()


def _download(
    folder: Path,
    listing: hub.RepoListing,
    todo: list[hub.RemoteFile],
    states: dict[str, FileState],
    result: PullResult,
    *,
    workers: int,
    progress: PullProgress,
) -> None:
    """Hash present files, fetch the rest; a file reaches its final path only once its hash matched."""
    stop = threading.Event()
    lock = threading.Lock()
    journal = _journal_path(folder)

    def fetch(remote: hub.RemoteFile, client: Any) -> None:
        state = states[remote.path]
        final = folder / remote.path
        if state.status == "present":
            why = _check_on_disk(final, remote, progress, action="check")
            if why is None:
                state.status = "verified"
                _journal(journal, listing.revision, remote, lock)
                return
            progress.note(f"{remote.path}: on disk but does not match the Hub ({why}); fetching it again")
        progress.file_started(remote.path, remote.size, action="get")
        part = _part_path(folder, remote.path)
        transfer = hub.Transfer(client, listing, remote, part, lambda n: progress.advance(remote.path, n), stop)
        why = transfer.run().mismatch(remote)
        if why:
            progress.note(f"{remote.path}: download does not match the Hub ({why}); fetching it again")
            with lock:
                result.refetched.append(remote.path)
                result.downloaded_bytes += remote.size
            transfer.restart()
            why = transfer.run().mismatch(remote)
            if why:
                raise IntegrityError(
                    f"{remote.path}: fetched twice and still does not match the Hub ({why})",
                    hint="the server or a proxy is serving bad bytes; try again later",
                )
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(transfer.part, final)
        state.status = "downloaded"
        with lock:
            result.downloaded_bytes += remote.size - state.have_bytes
        _journal(journal, listing.revision, remote, lock)
        progress.file_done(remote.path)

    progress.start(sum(r.size for r in todo))
    with hub.open_client() as client:
        _run_parallel(lambda remote: fetch(remote, client), todo, workers=workers, stop=stop)


def _check_on_disk(final: Path, remote: hub.RemoteFile, progress: PullProgress, *, action: str) -> str | None:
    """Hash a file already on disk, with progress; why it is not `remote`, or None when it is."""
    progress.file_started(remote.path, remote.size, action=action)
    hasher = hub.hash_file(final, remote, on_bytes=lambda n: progress.advance(remote.path, n))
    progress.file_done(remote.path)
    return hasher.mismatch(remote)


def _run_parallel(fn: Callable[[Any], None], items: Iterable[Any], *, workers: int, stop: threading.Event) -> None:
    """Run fn over items on `workers` threads; the first error (or Ctrl-C) stops the others, then re-raises."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dsv4-pull") as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((e for e in (f.exception() for f in done) if e is not None), None)
            if failed is not None:
                raise failed
        except BaseException:
            stop.set()
            for f in futures:
                f.cancel()
            raise


def _part_path(folder: Path, path: str) -> Path:
    return folder / PARTIAL_DIR / f"{path}.part"


def _journal_path(folder: Path) -> Path:
    return folder / PARTIAL_DIR / JOURNAL_NAME


def _existing_parent(folder: Path) -> Path:
    while not folder.exists():
        folder = folder.parent
    return folder


def _journal(journal: Path, revision: str, remote: hub.RemoteFile, lock: threading.Lock) -> None:
    line = json.dumps({"revision": revision, "path": remote.path, "size": remote.size, "sha256": remote.sha256})
    with lock:
        journal.parent.mkdir(parents=True, exist_ok=True)
        with open(journal, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _known_verified(folder: Path, revision: str) -> dict[str, dict[str, Any]]:
    """Files verified earlier at this revision: the manifest, plus the journal of an unfinished pull."""
    manifest = read_manifest(folder)
    known = dict(manifest["files"]) if manifest.get("revision") == revision else {}
    journal = _journal_path(folder)
    if journal.is_file():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if record.get("revision") == revision:
                known[record["path"]] = record
    return known


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a complete pull, or {} when there is none (or it is unreadable)."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}


def _write_manifest(folder: Path, listing: hub.RepoListing, selected: list[hub.RemoteFile]) -> None:
    """Record every verified file (keeping earlier entries of the same commit), atomically; tidy the partial dir."""
    old = read_manifest(folder)
    files = dict(old["files"]) if old.get("revision") == listing.revision else {}
    for remote in selected:
        sha256 = remote.sha256 or hub.hash_file(folder / remote.path, remote).sha256.hexdigest()
        files[remote.path] = {"size": remote.size, "sha256": sha256}
    manifest = {"repo": listing.repo, "revision": listing.revision, "files": dict(sorted(files.items()))}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_NAME)
    partial = folder / PARTIAL_DIR
    _journal_path(folder).unlink(missing_ok=True)
    if partial.is_dir() and not any(p.is_file() for p in partial.rglob("*")):  # keep parts of unselected files
        shutil.rmtree(partial)
