"""Hub access for `dsv4 pull`: repo metadata through huggingface_hub, byte transfer through httpx.

huggingface_hub gives us the endpoint, auth headers, file URLs, LFS sha256 values and typed errors. It does
not (2.4.0, measured) hash-check downloads, resume a partial file in a new process, or retry a 503, so the
transfer is done here: Range-resumed from `<file>.part`, retried with exponential backoff, hashed while
streaming. Environment variables are read at call time (huggingface_hub's constants are fixed at import).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import build_hf_headers

from dsv4cli.errors import AuthError, DownloadError, NotFoundOnHubError

CHUNK = 8 << 20
MAX_ATTEMPTS = 6
RESUME_HINT = "partial files are kept; run the same command again to resume"
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at a commit: size, and the digests the Hub publishes for it."""

    path: str
    size: int
    sha256: str | None = None  # LFS files only
    blob_id: str | None = None  # git blob sha1 (of the pointer, for LFS files)


@dataclass(frozen=True)
class RepoListing:
    repo: str
    revision: str  # the commit sha the requested revision resolved to
    files: tuple[RemoteFile, ...]


class TransientError(Exception):
    """A failure worth retrying: 5xx/429, reset, timeout, short body."""


class Stopped(Exception):
    """The stop event was set (Ctrl-C): leave the partial file as it is."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def retry_base() -> float:
    """Seconds before the first retry (doubling after); DSV4_RETRY_BASE lets tests run fast."""
    return float(os.environ.get("DSV4_RETRY_BASE", "1.0"))


def list_repo(repo: str, revision: str) -> RepoListing:
    """Every file of `repo` at `revision` with size and LFS sha256, in one API call (retried when transient)."""
    api = HfApi(endpoint=endpoint(), token=_token())

    def call() -> Any:
        try:
            return api.model_info(repo, revision=revision, files_metadata=True)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in _TRANSIENT_STATUS:
                raise TransientError(f"HTTP {status} from {endpoint()}") from e
            raise _hub_error(e, repo=repo, revision=revision) from e
        except httpx2.TransportError as e:
            raise TransientError(f"cannot reach {endpoint()} ({type(e).__name__}: {e})") from e

    info = with_retries(call, what=f"{repo} metadata")
    files = tuple(
        RemoteFile(
            path=s.rfilename,
            size=s.lfs.size if s.lfs else (s.size or 0),
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=s.blob_id,
        )
        for s in info.siblings or []
    )
    return RepoListing(repo=repo, revision=info.sha or revision, files=files)


def _hub_error(e: HfHubHTTPError, *, repo: str, revision: str) -> Exception:
    """Translate huggingface_hub's errors into ours; 401 is also what the Hub answers for private repos."""
    status = e.response.status_code if e.response is not None else None
    token_hint = _token_hint(repo)
    if isinstance(e, GatedRepoError):
        return AuthError(f"{repo} is gated and this token has not been granted access (HTTP {status})", hint=token_hint)
    if status == 401:  # the Hub's answer to an anonymous request for a private, gated or missing repo
        return AuthError(f"{repo}: not found, or private/gated and needs a token (HTTP 401)", hint=token_hint)
    if status == 403:
        return AuthError(f"{repo}: access denied (HTTP 403)", hint=token_hint)
    if isinstance(e, RevisionNotFoundError):
        return NotFoundOnHubError(f"{repo}: revision '{revision}' not found", hint="check --revision")
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        return NotFoundOnHubError(f"repo '{repo}' not found on {endpoint()}", hint="check the repo id")
    return DownloadError(f"{repo}: HTTP {status} from {endpoint()}", hint=RESUME_HINT)


def _token_hint(repo: str) -> str:
    return f"set HF_TOKEN to a token with access, and accept the licence on {endpoint()}/{repo}"


def with_retries(fn: Callable[[], Any], *, what: str, stop: threading.Event | None = None) -> Any:
    """Call `fn`, retrying TransientError with exponential backoff; give up with a DownloadError."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return fn()
        except TransientError as e:
            if attempt == MAX_ATTEMPTS:
                raise DownloadError(f"{what}: {e} (gave up after {attempt} attempts)", hint=RESUME_HINT) from e
            if (stop.wait if stop else time.sleep)(retry_base() * 2 ** (attempt - 1)):
                raise Stopped from e
    raise AssertionError("unreachable")


class FileHasher:
    """sha256 of the content, plus the git blob sha1 for non-LFS files (git hashes `blob <size>\\0` + content)."""

    def __init__(self, remote: RemoteFile) -> None:
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(f"blob {remote.size}\0".encode()) if remote.sha256 is None else None
        self.size = 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)
        self.size += len(data)

    def mismatch(self, remote: RemoteFile) -> str | None:
        """Why the hashed bytes are not `remote`, or None when they are."""
        if self.size != remote.size:
            return f"size {self.size} != {remote.size}"
        if remote.sha256 and self.sha256.hexdigest() != remote.sha256:
            return f"sha256 {self.sha256.hexdigest()} != {remote.sha256}"
        if self.sha1 is not None and remote.blob_id and self.sha1.hexdigest() != remote.blob_id:
            return f"git sha1 {self.sha1.hexdigest()} != {remote.blob_id}"
        return None


def hash_file(path: Path, remote: RemoteFile, *, on_bytes: Callable[[int], None] | None = None) -> FileHasher:
    """Hash a file on disk in chunks (never holding it)."""
    hasher = FileHasher(remote)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return hasher


def open_client() -> httpx2.Client:
    timeout = httpx2.Timeout(30.0, read=float(os.environ.get("DSV4_READ_TIMEOUT", "60")))
    return httpx2.Client(follow_redirects=True, timeout=timeout)


@dataclass
class Transfer:
    """One file download into `part`: resumed from the bytes already there, hashed as it streams."""

    client: httpx2.Client
    listing: RepoListing
    remote: RemoteFile
    part: Path
    on_bytes: Callable[[int], None]
    stop: threading.Event

    def run(self) -> FileHasher:
        """Download until `part` holds the whole file; returns its hasher (the caller checks it)."""
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self.part.touch()
        self._hasher = hash_file(self.part, self.remote) if self.part.stat().st_size else FileHasher(self.remote)
        self.on_bytes(self._hasher.size)
        return with_retries(self._attempt, what=self.remote.path, stop=self.stop)

    def restart(self) -> None:
        """Throw away what is in `part` (a hash mismatch, or a server that ignored our Range)."""
        self.on_bytes(-self.part.stat().st_size if self.part.exists() else 0)
        self.part.write_bytes(b"")
        self._hasher = FileHasher(self.remote)

    def _attempt(self) -> FileHasher:
        offset = self.part.stat().st_size
        if offset != self._hasher.size:  # a previous attempt wrote bytes the hasher did not see
            self.on_bytes(offset - self._hasher.size)
            self._hasher = hash_file(self.part, self.remote)
        if offset > self.remote.size:
            self.restart()
            offset = 0
        if offset == self.remote.size:
            return self._hasher
        url = hf_hub_url(self.listing.repo, self.remote.path, revision=self.listing.revision, endpoint=endpoint())
        headers = build_hf_headers(token=_token(), library_name="dsv4")
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with self.client.stream("GET", url, headers=headers) as response:
                self._check_status(response)
                if offset and response.status_code == 200:  # Range ignored: the body starts at byte 0
                    self.restart()
                with open(self.part, "ab") as f:
                    for chunk in response.iter_bytes():  # as received, so a drop loses nothing
                        if self.stop.is_set():
                            raise Stopped
                        f.write(chunk)
                        self._hasher.update(chunk)
                        self.on_bytes(len(chunk))
        except httpx2.TransportError as e:
            raise TransientError(f"{type(e).__name__}: {e or 'connection lost'}") from e
        if self._hasher.size < self.remote.size:
            raise TransientError(f"connection closed at byte {self._hasher.size} of {self.remote.size}")
        return self._hasher

    def _check_status(self, response: httpx2.Response) -> None:
        status = response.status_code
        if status in (200, 206):
            return
        if status in _TRANSIENT_STATUS:
            raise TransientError(f"HTTP {status}")
        if status == 416:  # the part is longer than the file: start over
            self.restart()
            raise TransientError("HTTP 416 (range not satisfiable), restarting the file")
        repo = self.listing.repo
        if status in (401, 403):
            raise AuthError(
                f"{repo}/{self.remote.path}: access denied (HTTP {status})",
                hint=_token_hint(repo),
            )
        if status == 404:
            raise NotFoundOnHubError(f"{repo}/{self.remote.path}: not found at revision {self.listing.revision}")
        raise DownloadError(f"{repo}/{self.remote.path}: HTTP {status}", hint=RESUME_HINT)
