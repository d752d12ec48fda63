"""`dsv4 pull`: get a checkpoint onto disk, complete and verified, resumable after any interruption.

Hub models: list the repo (sizes, LFS sha256), decide per file what is left, check free disk, then download
in parallel (dsv4cli.hub.api does the bytes). A file reaches its final path only after its hash matched; the
manifest (dsv4cli.models.local.MANIFEST_NAME) is written only after every selected file did. Built-in models are
written offline by dsv4cli.models.tiny and get the same manifest.

State on disk, per target folder (every name of ours starts with STATE_PREFIX, which no Hub file may use):
    <dir>/<file>                      verified files only
    <dir>/.dsv4-partial/<file>.part   bytes received so far (resumed with HTTP Range)
    <dir>/.dsv4-partial/verified.jsonl  files verified by an unfinished pull (so a rerun does not re-hash them)
    <dir>/.dsv4-pull.json             the manifest: repo, commit, {path: {size, sha256}}
    <dir>/.dsv4-pull.lock             held (flock) by the one pull or verify writing the folder

The listing is checked (dsv4cli.hub.api.check_listing) before anything is created, every file operation goes
through dsv4cli.hub.safe_paths (no symlink is followed below the folder), and a dry run writes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from dsv4cli.errors import DiskSpaceError, DownloadError, IntegrityError, UnsafePathError, UsageError
from dsv4cli.hub import api as hub
from dsv4cli.hub import gguf_repo, safe_paths
from dsv4cli.hub.manifest import (
    PARTIAL_DIR,
    is_real_dir,
    journal,
    known_verified,
    part_path,
    read_manifest,
    write_manifest,
)
from dsv4cli.models.local import LOCK_NAME, MANIFEST_NAME, STATE_PREFIX, foreign_entries
from dsv4cli.models.ref import split_hub_file, split_tag
from dsv4cli.models.registry import ModelSpec, get_model
from dsv4cli.units import human_bytes

BUILTIN_REVISION = "builtin"
BUILTIN_STAGING = "builtin-"  # built-in files are written under PARTIAL_DIR/builtin-XXXX, then moved into place


@dataclass(frozen=True)
class PullOptions:
    revision: str | None = None  # default: the registry's pinned revision
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    folder: Path | None = None  # default: spec.local_dir
    workers: int = 4
    dry_run: bool = False
    verify: bool = False
    tag: str | None = None  # the quant of a GGUF repo (`NAME:TAG`); set by `pull` from the name
    file: str | None = None  # one GGUF of a repo (`org/name/FILE.gguf`, all its shards); set by `pull` from the name


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

    A dry run only reads. Otherwise the folder is locked for the run; a second run into the same folder
    waits for the first, then finds its files verified.

    Raises:
        UnknownModelError, NotFoundOnHubError, AuthError: bad name, repo, revision or access.
        UnsafePathError, IntegrityError: a listing with unsafe names or sizes, a symlink planted in the folder.
        DiskSpaceError: free disk below what remains to download (nothing is started), or the disk filled up.
        DownloadError: network failure after retries (partial files are kept for resume).
        IntegrityError: a file still mismatches the Hub after being fetched again, or is longer than listed.
    """
    if options.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {options.workers}")
    hub_file = split_hub_file(name)
    base, tag = hub_file or split_tag(name)
    options = replace(options, tag=None, file=tag) if hub_file else replace(options, tag=tag)
    spec = get_model(base)
    listing = None
    # A registry model's pre-quantized GGUF: the first of its repos with the tag (a built-in model has none, and
    # find_on_hub says so in one line, as plan and show do)
    if tag and (spec.gguf_repos or spec.builtin):
        spec, listing, _ = gguf_repo.find_on_hub(spec, tag, lambda s: _listing(s, options, s.local_dir))
    folder = (options.folder or spec.local_dir).expanduser().resolve()
    progress = progress or _Silent()
    started = time.monotonic()
    from_disk = spec.builtin or hub.offline()
    if listing is None and not (from_disk and not options.dry_run):
        listing = _listing(spec, options, folder)
    if options.dry_run:
        assert listing is not None
        return _survey(spec, options, folder, listing, mode="dry-run")[0]
    if spec.builtin and not options.verify:
        _check_builtin_target(folder)
    # A verify of a folder that is not there has nothing to protect, and must not create it.
    nothing_there = options.verify and not folder.is_dir()
    lock = (
        contextlib.nullcontext()
        if nothing_there
        else safe_paths.folder_lock(folder, LOCK_NAME, what="`dsv4 pull`", on_wait=progress.note)
    )
    with lock:
        if spec.builtin and not options.verify:
            _write_builtin(spec, folder)
        listing = listing or _listing(spec, options, folder)  # the manifest, read once the folder is ours
        result, selected, states = _survey(spec, options, folder, listing, mode="verify" if options.verify else "pull")
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
            try:
                _download(folder, listing, todo, states, result, workers=options.workers, progress=progress)
                write_manifest(folder, listing, selected)
                _check_ggufs(folder, selected, spec)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise DiskSpaceError(
                    f"disk full writing {e.filename or folder}",
                    hint="verified files and partial downloads are kept; free some space and run the same "
                    "command again to resume",
                ) from e
    result.seconds = time.monotonic() - started
    result.verified = sum(s.status in ("verified", "downloaded") for s in states.values())
    return result


def _survey(
    spec: ModelSpec, options: PullOptions, folder: Path, listing: hub.RepoListing, *, mode: str
) -> tuple[PullResult, list[hub.RemoteFile], dict[str, FileState]]:
    """What the selected files need, and the result to fill in; reads only."""
    selected = _select(listing, options)
    states = _assess(folder, listing, selected)
    result = PullResult(
        model=spec.name,
        repo=spec.repo,
        revision=listing.revision,
        folder=folder,
        mode=mode,
        builtin=spec.builtin,
        files=list(states.values()),
        total_bytes=sum(f.size for f in selected),
        remaining_bytes=sum(s.size - s.have_bytes for s in states.values() if s.status in ("partial", "missing")),
        free_bytes=shutil.disk_usage(_existing_parent(folder)).free,
    )
    return result, selected, states


def _write_builtin(spec: ModelSpec, folder: Path) -> None:
    """Write a built-in checkpoint offline and record it in a manifest, unless a complete one is there.

    The files are written into the partial folder and moved into place one by one, so nothing is written
    outside `folder` and a file under its final name is always complete.
    """
    if read_manifest(folder).get("revision") == BUILTIN_REVISION:
        return
    _check_builtin_target(folder)
    from dsv4cli.models.tiny import write_tiny_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    safe_paths.make_dirs(folder, PARTIAL_DIR)
    for stale in (folder / PARTIAL_DIR).glob(f"{BUILTIN_STAGING}*"):  # left by an interrupted run
        if is_real_dir(stale):
            shutil.rmtree(stale)
    # A fresh, uniquely named folder: nothing can have been planted in it.
    workdir = Path(tempfile.mkdtemp(prefix=BUILTIN_STAGING, dir=folder / PARTIAL_DIR))
    write_tiny_checkpoint(spec, workdir / "checkpoint")
    staging = (workdir / "checkpoint").relative_to(folder).as_posix()
    files = []
    for path in sorted(p for p in (workdir / "checkpoint").rglob("*") if p.is_file()):
        rel = path.relative_to(workdir / "checkpoint").as_posix()
        hasher = hub.hash_file(folder, f"{staging}/{rel}", hub.RemoteFile(rel, path.stat().st_size))
        files.append(hub.RemoteFile(rel, hasher.size, sha256=hasher.sha256.hexdigest()))
        safe_paths.replace(folder, f"{staging}/{rel}", rel)
    shutil.rmtree(workdir)
    listing = hub.RepoListing(repo=f"builtin:{spec.name}", revision=BUILTIN_REVISION, files=tuple(files))
    write_manifest(folder, listing, files)


def _check_builtin_target(folder: Path) -> None:
    """Only a folder we wrote (manifest or partial dir) may already hold files: a built-in model is written
    over what is there."""
    if foreign_entries(folder) and not read_manifest(folder) and not is_real_dir(folder / PARTIAL_DIR):
        raise UsageError(f"{folder} is not empty and was not written by `dsv4 pull`", hint="pass an empty --dir")


def _listing(spec: ModelSpec, options: PullOptions, folder: Path) -> hub.RepoListing:
    """The Hub's file list (the manifest stands in for it for built-in models and under HF_HUB_OFFLINE),
    checked before anything is created."""
    listing = _manifest_listing(spec, options, folder) if spec.builtin or hub.offline() else None
    if listing is None:
        assert spec.repo is not None
        listing = hub.list_repo(spec.repo, options.revision or spec.revision)
    hub.check_listing(listing, reserved_prefix=STATE_PREFIX)
    # Partial files live side by side under PARTIAL_DIR: `d` and `d.part/x` would need `d.part` as both.
    clash = safe_paths.listing_problem(part_path(f.path) for f in listing.files)
    if clash:
        name = clash[0].removeprefix(f"{PARTIAL_DIR}/").removesuffix(".part")
        raise UnsafePathError(
            f"{listing.repo}: refusing file name {safe_paths.readable_name(name)} from the listing: its partial "
            "file would clash with another listed file",
            hint="nothing was written; the repo is malformed or hostile",
        )
    return listing


def _manifest_listing(spec: ModelSpec, options: PullOptions, folder: Path) -> hub.RepoListing:
    manifest = read_manifest(folder)
    if spec.builtin and not manifest and options.dry_run:  # list what would be written: write it aside
        with tempfile.TemporaryDirectory(prefix="dsv4-dry-run-") as tmp:
            _write_builtin(spec, Path(tmp) / "checkpoint")
            manifest = read_manifest(Path(tmp) / "checkpoint")
    if not manifest:
        what = "was never written there" if spec.builtin else "has no complete pull there"
        raise DownloadError(
            f"{spec.name} {what} ({folder}) and the Hub cannot be asked",
            hint=f"run `dsv4 pull {spec.name}`" if spec.builtin else "unset HF_HUB_OFFLINE",
        )
    try:
        files = tuple(
            hub.RemoteFile(path, entry["size"], sha256=entry["sha256"]) for path, entry in manifest["files"].items()
        )
        return hub.RepoListing(repo=str(manifest["repo"]), revision=str(manifest["revision"]), files=files)
    except (KeyError, TypeError) as e:
        raise UnsafePathError(
            f"{folder / MANIFEST_NAME} is malformed ({type(e).__name__}: {e})",
            hint="delete it and run `dsv4 pull` again to re-check the files",
        ) from e


def _check_ggufs(folder: Path, selected: list[hub.RemoteFile], spec: ModelSpec) -> None:
    """A pulled GGUF (another producer's) passes the same header check as our own before anything loads it.

    The files stay (they are exactly what the repo holds, and complete); the error says they cannot run.
    """
    from dsv4cli.errors import RuntimeLoadError
    from dsv4cli.gguf_io.check import check_gguf

    for first in gguf_repo.first_shards(f.path for f in selected):
        try:
            check_gguf(folder / first)
        except RuntimeLoadError as e:
            raise RuntimeLoadError(
                f"{spec.name}: downloaded, but {e}", hint=f"`dsv4 rm {spec.name}` removes it; {e.hint or ''}".strip()
            ) from e


def _select(listing: hub.RepoListing, options: PullOptions) -> list[hub.RemoteFile]:
    from huggingface_hub.utils import filter_repo_objects

    picked = f":{options.tag}" if options.tag else options.file
    if picked and (options.include or options.exclude):
        raise UsageError(f"both {picked} and --include/--exclude pick files of {listing.repo}", hint="use one of them")
    patterns = options.include or options.exclude
    if options.file:
        wanted = set(gguf_repo.select_file((f.path for f in listing.files), options.file, repo=listing.repo))
        return [f for f in listing.files if f.path in wanted]
    if options.tag or (not patterns and gguf_repo.is_gguf_repo(f.path for f in listing.files)):
        wanted = set(gguf_repo.select_quant((f.path for f in listing.files), options.tag, repo=listing.repo))
        return [f for f in listing.files if f.path in wanted]
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
    """What each selected file needs: nothing (verified), a hash (present), the rest of it, or all of it.

    Only regular files reached without symlinks count; anything else there is replaced by the download.
    """
    known = known_verified(folder, listing.revision)
    states = {}
    for remote in selected:
        size = safe_paths.file_size(folder, remote.path)
        part_size = safe_paths.file_size(folder, part_path(remote.path))
        if size == remote.size:
            record = known.get(remote.path, {})
            trusted = record.get("size") == remote.size and (not remote.sha256 or record.get("sha256") == remote.sha256)
            states[remote.path] = FileState(remote.path, remote.size, "verified" if trusted else "present", remote.size)
        elif part_size is not None:
            states[remote.path] = FileState(remote.path, remote.size, "partial", min(part_size, remote.size))
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
        if safe_paths.file_size(folder, remote.path) is None:
            state.status = "mismatch"
            progress.note(f"{remote.path}: missing")
            return
        why = _check_on_disk(folder, remote, progress, action="hash")
        state.status = "mismatch" if why else "verified"
        if why:
            progress.note(f"{remote.path}: does not match the Hub ({why})")

    progress.start(sum(r.size for r in remotes.values() if safe_paths.file_size(folder, r.path) is not None))
    _run_parallel(check, list(remotes.values()), workers=workers, stop=threading.Event())
    result.mismatched = sorted(p for p, s in states.items() if s.status == "mismatch")
    if result.mismatched and read_manifest(folder):
        # No longer complete: keep what verified in the journal so the next pull fetches only the bad files.
        lock = threading.Lock()
        for path, state in states.items():
            if state.status == "verified":
                journal(folder, result.revision, remotes[path], lock)
        safe_paths.unlink(folder, MANIFEST_NAME)


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

    def fetch(remote: hub.RemoteFile, client: Any) -> None:
        state = states[remote.path]
        if state.status == "present":
            why = _check_on_disk(folder, remote, progress, action="check")
            if why is None:
                state.status = "verified"
                journal(folder, listing.revision, remote, lock)
                return
            progress.note(f"{remote.path}: on disk but does not match the Hub ({why}); fetching it again")
        progress.file_started(remote.path, remote.size, action="get")
        part = part_path(remote.path)
        advance = lambda n: progress.advance(remote.path, n)  # noqa: E731
        transfer = hub.Transfer(client, listing, remote, folder, part, advance, stop)
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
        safe_paths.replace(folder, part, remote.path)
        state.status = "downloaded"
        with lock:
            result.downloaded_bytes += remote.size - state.have_bytes
        journal(folder, listing.revision, remote, lock)
        progress.file_done(remote.path)

    progress.start(sum(r.size for r in todo))
    with hub.open_client() as client:
        _run_parallel(lambda remote: fetch(remote, client), todo, workers=workers, stop=stop)


def _check_on_disk(folder: Path, remote: hub.RemoteFile, progress: PullProgress, *, action: str) -> str | None:
    """Hash a file already on disk, with progress; why it is not `remote`, or None when it is."""
    progress.file_started(remote.path, remote.size, action=action)
    hasher = hub.hash_file(folder, remote.path, remote, on_bytes=lambda n: progress.advance(remote.path, n))
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


def _existing_parent(folder: Path) -> Path:
    while not folder.exists():
        folder = folder.parent
    return folder
