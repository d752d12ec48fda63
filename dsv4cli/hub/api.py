"""Hub access for `dsv4 pull`: repo metadata through huggingface_hub, byte transfer through httpx.

huggingface_hub gives us the endpoint, auth headers, file URLs, LFS sha256 values and typed errors. It does
not (2.4.0, measured) hash-check downloads, resume a partial file in a new process, or retry a 503, so the
transfer is done here: Range-resumed from `<file>.part`, retried with exponential backoff, hashed while
streaming. Environment variables are read at call time (huggingface_hub's constants are fixed at import).

A repo is untrusted input: `check_listing` rejects unsafe names and malformed sizes or digests before anything
is created, and a transfer never writes past the size the listing announced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
from huggingface_hub import ModelInfo, hf_hub_url
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

from dsv4cli.deadline import Deadline, env_seconds
from dsv4cli.errors import AuthError, DownloadError, IntegrityError, NotFoundOnHubError, UnsafePathError
from dsv4cli.hub import safe_paths

CHUNK = 8 << 20
MAX_ATTEMPTS = 6
RESUME_HINT = "partial files are kept; run the same command again to resume"
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_FILES = 100_000  # far above any real checkpoint; bounds the work a hostile listing can ask for
MAX_FILE_BYTES = 1 << 50
MAX_API_BYTES = 64 << 20  # a listing of MAX_FILES entries is ~30 MB of JSON; more is refused before decoding
TIMEOUT_ENV = "DSV4_HUB_TIMEOUT"
HUB_TIMEOUT_S = 60.0  # one Hub call in all: connect, answer, body and retries
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
# A redirect loop, or one to a scheme or URL httpx cannot follow: the same answer on every retry.
BROKEN_REDIRECT = (httpx2.TooManyRedirects, httpx2.UnsupportedProtocol, httpx2.InvalidURL, httpx2.DecodingError)


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


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def retry_base() -> float:
    """Seconds before the first retry (doubling after); DSV4_RETRY_BASE lets tests run fast."""
    return float(os.environ.get("DSV4_RETRY_BASE", "1.0"))


def hub_timeout() -> float:
    """Seconds one Hub call may take in all, retries included (DSV4_HUB_TIMEOUT)."""
    return env_seconds(TIMEOUT_ENV, HUB_TIMEOUT_S)


def late_error(what: str, deadline: Deadline) -> DownloadError:
    """The error for a Hub call that did not finish in time: names the server, the call and the deadline."""
    return DownloadError(
        f"{what}: {endpoint()} did not answer within {deadline.seconds:g} s",
        hint=f"check the network or HF_ENDPOINT, or allow more time with {TIMEOUT_ENV}=SECONDS",
    )


def read_body(response: httpx2.Response, *, limit: int, what: str) -> bytes:
    """The decoded body, refused once it passes `limit` bytes; a gzip/deflate body is inflated in bounded steps,
    so a compression bomb costs `limit` bytes of memory, not what it expands to."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "", "gzip", "deflate"):
        raise IntegrityError(f"{what}: the Hub answered with an unsupported Content-Encoding {encoding!r}")
    inflate = zlib.decompressobj(wbits=47) if encoding in ("gzip", "deflate") else None  # 47: zlib or gzip header
    body = bytearray()
    try:
        for chunk in response.iter_raw():
            data = inflate.decompress(chunk, limit + 1 - len(body)) if inflate else chunk
            body += data
            if len(body) > limit or (inflate is not None and inflate.unconsumed_tail):
                raise IntegrityError(
                    f"{what}: the Hub's answer is larger than {limit >> 20} MiB decoded; refused",
                    hint="nothing was written; the repo is malformed or hostile",
                )
    except zlib.error as e:
        raise IntegrityError(f"{what}: the Hub's compressed answer is corrupt ({e})") from e
    return bytes(body)


def list_repo(repo: str, revision: str) -> RepoListing:
    """Every file of `repo` at `revision` with size and LFS sha256, in one API call (retried when transient,
    within DSV4_HUB_TIMEOUT in all; the answer is bounded to MAX_API_BYTES before it is decoded)."""
    deadline = Deadline(hub_timeout())
    url = f"{endpoint()}/api/models/{repo}/revision/{quote(revision, safe='')}"
    headers = {**build_hf_headers(token=token(), library_name="dsv4"), "Accept-Encoding": "gzip"}

    def call() -> Any:
        try:
            with (
                open_client(deadline) as client,
                client.stream("GET", url, params={"blobs": "true"}, headers=headers) as r,
            ):
                body = read_body(r, limit=MAX_API_BYTES, what=f"{repo} metadata")
                kept = {k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "content-length")}
                answer = httpx2.Response(r.status_code, headers=kept, content=body, request=r.request)
            hf_raise_for_status(answer)
            return ModelInfo(**json.loads(body))
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in _TRANSIENT_STATUS:
                raise TransientError(f"HTTP {status} from {endpoint()}") from e
            raise _hub_error(e, repo=repo, revision=revision) from e
        except BROKEN_REDIRECT as e:
            raise DownloadError(f"{repo}: {type(e).__name__} from {endpoint()}: {e}") from e
        except httpx2.TransportError as e:
            raise TransientError(f"cannot reach {endpoint()} ({type(e).__name__}: {e})") from e
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:  # parsing a bad answer
            raise IntegrityError(
                f"{repo}: the Hub answered with a malformed listing ({type(e).__name__}: {e})",
                hint="nothing was written; the repo is malformed or hostile",
            ) from e

    info = with_retries(call, what=f"{repo} metadata", deadline=deadline)
    files = tuple(
        RemoteFile(
            path=s.rfilename,
            size=s.lfs.size if s.lfs else s.size,
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=s.blob_id,
        )
        for s in info.siblings or []
    )
    return RepoListing(repo=repo, revision=info.sha or revision, files=files)


def check_listing(listing: RepoListing, *, reserved_prefix: str) -> None:
    """Refuse a listing that could write outside the target or that cannot be verified, before any write.

    Every name must be a safe relative path (dsv4cli.hub.safe_paths), the set must be creatable together and leave
    names starting with `reserved_prefix` to dsv4; every size must be a plausible byte count and every file
    must carry a digest to check the bytes against.
    """
    revision = listing.revision
    if not (isinstance(revision, str) and revision.isprintable() and 0 < len(revision) <= 256):
        raise IntegrityError(
            f"{listing.repo}: the Hub answered with a malformed commit id {safe_paths.readable_name(revision)}"
        )
    where = f"{listing.repo}@{revision[:12]}"
    if len(listing.files) > MAX_FILES:
        raise UnsafePathError(f"{where}: the listing has {len(listing.files)} files (at most {MAX_FILES} accepted)")
    problem = safe_paths.listing_problem((f.path for f in listing.files), reserved_prefix=reserved_prefix)
    if problem:
        name, why = problem
        raise UnsafePathError(
            f"{where}: refusing file name {safe_paths.readable_name(name)} from the Hub listing: it {why}",
            hint="nothing was written; the repo is malformed or hostile",
        )
    for f in listing.files:
        why = _entry_problem(f)
        if why:
            raise IntegrityError(
                f"{where}: {safe_paths.readable_name(f.path)} in the Hub listing {why}",
                hint="nothing was written; the repo is malformed or hostile",
            )


def _entry_problem(f: RemoteFile) -> str | None:
    if type(f.size) is not int or not 0 <= f.size <= MAX_FILE_BYTES:
        return f"has an invalid size ({f.size!r}; a byte count up to 2**50 expected)"
    if f.sha256 is not None and not (isinstance(f.sha256, str) and _SHA256.fullmatch(f.sha256)):
        return f"has a malformed sha256 ({f.sha256!r})"
    if f.blob_id is not None and not (isinstance(f.blob_id, str) and _SHA1.fullmatch(f.blob_id)):
        return f"has a malformed git blob id ({f.blob_id!r})"
    if f.sha256 is None and f.blob_id is None:
        return "has neither a sha256 nor a git blob id to verify it against"
    return None


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


def with_retries(
    fn: Callable[[], Any], *, what: str, stop: threading.Event | None = None, deadline: Deadline | None = None
) -> Any:
    """Call `fn`, retrying TransientError with exponential backoff; give up with a DownloadError. With a
    deadline every attempt and wait fits inside it, and the call ends when it passes however the server stalls."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return fn() if deadline is None else deadline.run(fn)
        except TimeoutError as e:
            if deadline is None:
                raise
            raise late_error(what, deadline) from e
        except TransientError as e:
            wait = retry_base() * 2 ** (attempt - 1)
            if attempt == MAX_ATTEMPTS or (deadline is not None and wait >= deadline.end - time.monotonic()):
                raise DownloadError(f"{what}: {e} (gave up after {attempt} attempts)", hint=RESUME_HINT) from e
            if (stop.wait if stop else time.sleep)(wait):
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


def hash_file(root: Path, rel: str, remote: RemoteFile, *, on_bytes: Callable[[int], None] | None = None) -> FileHasher:
    """Hash root/rel in chunks (never holding it, never following a symlink); reads at most one byte past
    the expected size, so a file that is longer, or keeps growing, costs no more than the real one."""
    hasher = FileHasher(remote)
    with safe_paths.open_file(root, rel, "rb") as f:
        while hasher.size <= remote.size and (chunk := f.read(min(CHUNK, remote.size + 1 - hasher.size))):
            hasher.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return hasher


def open_client(deadline: Deadline | None = None) -> httpx2.Client:
    """A client for Hub requests; with a deadline no single wait outlasts what is left of it."""
    if deadline is not None:
        timeout = httpx2.Timeout(deadline.left())
    else:
        timeout = httpx2.Timeout(30.0, read=float(os.environ.get("DSV4_READ_TIMEOUT", "60")))
    return httpx2.Client(follow_redirects=True, timeout=timeout)


@dataclass
class Transfer:
    """One file download into root/part: resumed from the bytes already there, hashed as it streams, and
    never longer than the listing's size (a longer body is an integrity error and the part is deleted)."""

    client: httpx2.Client
    listing: RepoListing
    remote: RemoteFile
    root: Path
    part: str  # relative to root; opened through dsv4cli.hub.safe_paths only
    on_bytes: Callable[[int], None]
    stop: threading.Event

    def run(self) -> FileHasher:
        """Download until the part holds the whole file; returns its hasher (the caller checks it)."""
        with safe_paths.open_file(self.root, self.part, "ab"):
            pass
        self._hasher = self._hash_part()
        self.on_bytes(self._hasher.size)
        return with_retries(self._attempt, what=self.remote.path, stop=self.stop)

    def restart(self) -> None:
        """Throw away what is in the part (a hash mismatch, or a server that ignored our Range)."""
        self.on_bytes(-(safe_paths.file_size(self.root, self.part) or 0))
        with safe_paths.open_file(self.root, self.part, "wb"):
            pass
        self._hasher = FileHasher(self.remote)

    def _hash_part(self) -> FileHasher:
        return hash_file(self.root, self.part, self.remote) if self._part_size() else FileHasher(self.remote)

    def _part_size(self) -> int:
        return safe_paths.file_size(self.root, self.part) or 0

    def _attempt(self) -> FileHasher:
        offset = self._part_size()
        if offset != self._hasher.size:  # a previous attempt wrote bytes the hasher did not see
            self.on_bytes(offset - self._hasher.size)
            self._hasher = self._hash_part()
        if offset > self.remote.size:
            self.restart()
            offset = 0
        if offset == self.remote.size:
            return self._hasher
        url = hf_hub_url(self.listing.repo, self.remote.path, revision=self.listing.revision, endpoint=endpoint())
        # identity: the bytes on the wire are the file's bytes, so a compressed body cannot expand in memory.
        headers = {**build_hf_headers(token=token(), library_name="dsv4"), "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with self.client.stream("GET", url, headers=headers) as response:
                self._check_status(response)
                if offset and response.status_code == 200:  # Range ignored: the body starts at byte 0
                    self.restart()
                    offset = 0
                self._check_length(response, offset)
                with safe_paths.open_file(self.root, self.part, "ab") as f:
                    for chunk in response.iter_raw():  # as received, so a drop loses nothing
                        if self.stop.is_set():
                            raise Stopped
                        if len(chunk) > self.remote.size - self._hasher.size:
                            self._fail(f"sent more than the {self.remote.size} bytes the listing says")
                        f.write(chunk)
                        self._hasher.update(chunk)
                        self.on_bytes(len(chunk))
        except BROKEN_REDIRECT as e:  # retrying cannot help
            raise DownloadError(f"{self.listing.repo}/{self.remote.path}: {type(e).__name__}: {e}") from e
        except httpx2.TransportError as e:
            raise TransientError(f"{type(e).__name__}: {e or 'connection lost'}") from e
        if self._hasher.size < self.remote.size:
            raise TransientError(f"connection closed at byte {self._hasher.size} of {self.remote.size}")
        return self._hasher

    def _check_length(self, response: httpx2.Response, offset: int) -> None:
        """Before any byte is written: the body must be the rest of a file of the listed size, starting where
        the part ends. A server announcing another size has another file (the repo changed, or it lies)."""
        total: int | None = None
        if response.status_code == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
            if not m or int(m[1]) != offset:
                self.restart()
                raise TransientError(f"asked for bytes from {offset}, got {response.headers.get('Content-Range')}")
            total = int(m[3]) if m[3] != "*" else None
        length = response.headers.get("Content-Length", "")
        if total is None and length.isdigit():
            total = offset + int(length)
        if total is not None and total != self.remote.size:
            self._fail(f"announces {total} bytes for it, the listing says {self.remote.size}")

    def _fail(self, what: str) -> None:
        """An integrity error for this file; its part is deleted (its bytes belong to another file)."""
        self.on_bytes(-self._hasher.size)
        safe_paths.unlink(self.root, self.part)
        raise IntegrityError(
            f"{self.listing.repo}/{self.remote.path}: the server {what}; the partial file was deleted",
            hint="the repo changed or the server is misbehaving; run the same command again later",
        )

    def _check_status(self, response: httpx2.Response) -> None:
        if response.status_code == 416:  # the part is longer than the file: start over
            self.restart()
            raise TransientError("HTTP 416 (range not satisfiable), restarting the file")
        check_status(response, self.listing, self.remote)


def check_status(response: httpx2.Response, listing: RepoListing, remote: RemoteFile) -> None:
    """Raise the typed error for a failed request for `remote`'s bytes (TransientError where a retry may help)."""
    status = response.status_code
    if status in (200, 206):
        return
    if status in _TRANSIENT_STATUS:
        raise TransientError(f"HTTP {status}")
    repo = listing.repo
    if status in (401, 403):
        raise AuthError(f"{repo}/{remote.path}: access denied (HTTP {status})", hint=_token_hint(repo))
    if status == 404:
        raise NotFoundOnHubError(f"{repo}/{remote.path}: not found at revision {listing.revision}")
    raise DownloadError(f"{repo}/{remote.path}: HTTP {status}", hint=RESUME_HINT)
