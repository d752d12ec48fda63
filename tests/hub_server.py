"""A Hub-compatible HTTP server on 127.0.0.1 serving one model repo from a local folder, with fault injection.

It answers what huggingface_hub 2.4.0 asks for `model_info`/`repo_info` (GET /api/models/{repo}[/revision/{rev}]),
`list_repo_tree` (GET /api/models/{repo}/tree/{rev}) and `hf_hub_download` (HEAD/GET /{repo}/resolve/{rev}/{path},
with ETag, X-Repo-Commit, X-Linked-Size/-Etag and Range), so both `dsv4 pull` and `snapshot_download` run against
it through HF_ENDPOINT. Files matching `lfs_patterns` are published as LFS files (with sha256), the others as
plain git blobs (sha1 only), like a Hub repo whose .gitattributes tracks weights with LFS.

Hostile mode, for the tests that treat a repo as untrusted input: `add_file` publishes any name (`../x`, an
absolute path, control characters, a name aimed at a planted symlink) with in-memory bytes and any listed
fields; `Faults.oversize` sends more bytes than listed, `Faults.chunked` sends bodies without Content-Length
(so a client cannot know the length before reading), and `Faults.change_after_listing` swaps a file's bytes
right after the first listing was served (a repo that changes between the listing and the download).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

CHUNK = 1 << 20


@dataclass
class Faults:
    """Misbehaviour to inject; counters are consumed as requests arrive."""

    drop_after: dict[str, int] = field(default_factory=dict)  # path -> close the connection after N body bytes, once
    corrupt: dict[str, int] = field(default_factory=dict)  # path -> serve a flipped byte this many times
    unavailable: int = 0  # answer the next K requests with 503
    token: str | None = None  # require `Authorization: Bearer <token>`
    ignore_range: bool = False  # answer 200 with the whole file even when a Range was asked
    bytes_per_second: int | None = None  # throttle file bodies (to interrupt a download midway)
    oversize: dict[str, int] = field(default_factory=dict)  # path -> extra bytes sent after the listed body
    chunked: bool = False  # bodies with Transfer-Encoding: chunked and no Content-Length
    change_after_listing: dict[str, bytes] = field(default_factory=dict)  # path -> bytes served after 1st listing
    listing_body: bytes | None = None  # served as the listing (model_info/tree) instead of the honest one
    redirect_to: str | None = None  # answer file requests with a 302 to this Location


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    range: str | None
    status: int


@dataclass(frozen=True)
class _Entry:
    path: str
    file: Path | None  # None: the bytes are `data`
    size: int
    blob_id: str
    sha256: str | None  # None: not an LFS file
    data: bytes | None = None
    listed: dict[str, Any] = field(default_factory=dict)  # fields that override the honest listing entry

    def open(self) -> Any:
        return io.BytesIO(self.data) if self.file is None else open(self.file, "rb")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def memory_entry(path: str, data: bytes, *, lfs: bool = True, listed: dict[str, Any] | None = None) -> _Entry:
    """An entry served from memory, under any name (hostile tests publish names no folder could hold)."""
    sha256 = hashlib.sha256(data).hexdigest() if lfs else None
    blob_id = git_blob_sha1(_lfs_pointer(sha256, len(data)) if sha256 else data)
    return _Entry(path, None, len(data), blob_id, sha256, data, listed or {})


def _describe(root: Path, file: Path, lfs_patterns: tuple[str, ...]) -> _Entry:
    size = file.stat().st_size
    rel = file.relative_to(root).as_posix()
    if not any(fnmatch(rel, pattern) for pattern in lfs_patterns):
        return _Entry(rel, file, size, git_blob_sha1(file.read_bytes()), None)
    with open(file, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return _Entry(rel, file, size, git_blob_sha1(_lfs_pointer(sha256, size)), sha256)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hang up mid-body on purpose in these tests (Ctrl-C, a failed sibling download)."""


class HubServer:
    """Serve `root` as model repo `repo`. Use as a context manager; `url` goes into HF_ENDPOINT."""

    def __init__(
        self, root: Path, repo: str = "test-org/tiny", *, lfs_patterns: tuple[str, ...] = ("*.safetensors", "*.gguf")
    ) -> None:
        self.repo = repo
        files = sorted(p for p in root.rglob("*") if p.is_file())
        self.entries = {e.path: e for e in (_describe(root, p, lfs_patterns) for p in files)}
        self.commit = hashlib.sha1(
            json.dumps([(e.path, e.blob_id) for e in self.entries.values()]).encode()
        ).hexdigest()
        self.faults = Faults()
        self.listings_served = 0
        self.log: list[LoggedRequest] = []
        self.lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval: shutdown() waits up to one interval for the serving loop to notice.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add_file(self, path: str, data: bytes, *, lfs: bool = True, listed: dict[str, Any] | None = None) -> None:
        """Publish `data` under any name; `listed` overrides fields of its listing entry (e.g. {"size": -1})."""
        self.entries[path] = memory_entry(path, data, lfs=lfs, listed=listed)

    def requests_for(self, path: str) -> list[LoggedRequest]:
        """Logged GETs of one file's bytes."""
        return [r for r in self.log if r.method == "GET" and r.path.endswith(f"/resolve/{self.commit}/{path}")]

    # --- API payloads, shaped like the Hub's -------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        siblings = []
        for e in self.entries.values():
            sibling: dict[str, Any] = {"rfilename": e.path, "size": e.size, "blobId": e.blob_id}
            if e.sha256:
                sibling["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": 134}
            siblings.append({**sibling, **e.listed})
        return {
            "_id": "0",
            "id": self.repo,
            "modelId": self.repo,
            "sha": self.commit,
            "private": False,
            "siblings": siblings,
        }

    def tree(self) -> list[dict[str, Any]]:
        items = []
        for e in self.entries.values():
            item: dict[str, Any] = {"type": "file", "path": e.path, "size": e.size, "oid": e.blob_id}
            if e.sha256:
                item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
            items.append(item)
        return items


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    api = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/.*)?)?$")
    resolve = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_POST(self) -> None:
            self._send_json(405, {"error": "not implemented"})

        def _serve(self, *, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:  # only repo requests (huggingface_hub also asks for other things)
                unavailable = hub.faults.unavailable > 0 and bool(api.match(path) or resolve.match(path))
                hub.faults.unavailable -= unavailable
            if unavailable:
                return self._send_json(503, {"error": "Service Unavailable"}, path=path)
            if hub.faults.token and self.headers.get("Authorization") != f"Bearer {hub.faults.token}":
                return self._send_json(401, {"error": "Invalid username or password."}, path=path)
            if m := api.match(path):
                if not self._known(m["repo"], m["rev"] or "main", path):
                    return None
                payload = hub.tree() if m["kind"] == "tree" else hub.model_info()
                self._send_json(200, payload, path=path, raw=hub.faults.listing_body)
                return self._after_listing()
            if m := resolve.match(path):
                if not self._known(m["repo"], m["rev"], path):
                    return None
                if hub.faults.redirect_to is not None:
                    return self._redirect(hub.faults.redirect_to, path=path)
                entry = hub.entries.get(m["path"])
                if entry is None:
                    return self._send_json(404, {"error": "Entry not found"}, path=path, code="EntryNotFound")
                return self._send_file(entry, body=body, path=path)
            return self._send_json(404, {"error": "Not found"}, path=path)

        def _after_listing(self) -> None:
            with hub.lock:
                hub.listings_served += 1
                changes, hub.faults.change_after_listing = hub.faults.change_after_listing, {}
                for name, data in changes.items():
                    old = hub.entries[name]
                    hub.entries[name] = memory_entry(name, data, lfs=old.sha256 is not None)

        def _known(self, repo: str, rev: str, path: str) -> bool:
            if repo != hub.repo:
                self._send_json(404, {"error": "Repository not found"}, path=path, code="RepoNotFound")
                return False
            if rev not in ("main", hub.commit):
                self._send_json(404, {"error": f"Invalid rev id: {rev}"}, path=path, code="RevisionNotFound")
                return False
            return True

        def _record(self, path: str, status: int) -> None:
            with hub.lock:
                hub.log.append(LoggedRequest(self.command, path, self.headers.get("Range"), status))

        def _redirect(self, location: str, *, path: str) -> None:
            self._record(path, 302)
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send_json(
            self, status: int, payload: Any, *, path: str = "", code: str | None = None, raw: bytes | None = None
        ) -> None:
            self._record(path, status)
            data = json.dumps(payload).encode() if raw is None else raw
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code:
                self.send_header("X-Error-Code", code)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _send_file(self, entry: _Entry, *, body: bool, path: str) -> None:
            start, end = 0, entry.size - 1
            asked = self.headers.get("Range")
            if asked and not hub.faults.ignore_range:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", asked)
                start = int(m[1]) if m else 0
                end = min(int(m[2]), end) if m and m[2] else end
                if start >= entry.size:
                    self._record(path, 416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{entry.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            status = 206 if start or end < entry.size - 1 else 200
            self._record(path, status)
            self.send_response(status)
            etag = entry.sha256 or entry.blob_id
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("Accept-Ranges", "bytes")
            if entry.sha256:
                self.send_header("X-Linked-Size", str(entry.size))
                self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
            extra = hub.faults.oversize.get(entry.path, 0)
            if hub.faults.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(end + 1 - start + extra))
            self.end_headers()
            if body:
                self._stream(entry, start, end + 1)
                self._write(b"\xee" * extra)
                if hub.faults.chunked:
                    self.wfile.write(b"0\r\n\r\n")

        def _write(self, data: bytes) -> None:
            if not data:
                return
            if hub.faults.chunked:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            else:
                self.wfile.write(data)

        def _stream(self, entry: _Entry, start: int, stop: int) -> None:
            with hub.lock:
                drop = hub.faults.drop_after.pop(entry.path, None)
                corrupt = hub.faults.corrupt.get(entry.path, 0) > 0
                if corrupt:
                    hub.faults.corrupt[entry.path] -= 1
            flip_at = entry.size // 2
            sent = 0
            rate = hub.faults.bytes_per_second
            piece = min(CHUNK, rate // 20) if rate else CHUNK
            with entry.open() as f:
                f.seek(start)
                pos = start
                while chunk := f.read(min(piece, stop - pos)):
                    if rate:
                        time.sleep(len(chunk) / rate)
                    if corrupt and pos <= flip_at < pos + len(chunk):
                        chunk = bytearray(chunk)
                        chunk[flip_at - pos] ^= 0xFF
                    if drop is not None and sent + len(chunk) >= drop:
                        self._write(bytes(chunk[: drop - sent]))
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    self._write(bytes(chunk))
                    sent += len(chunk)
                    pos += len(chunk)

    return Handler


@contextlib.contextmanager
def published(root: Path, repo: str, monkeypatch: Any) -> Iterator[HubServer]:
    """Serve `root` as `repo`, with HF_ENDPOINT pointing at it and fast retries, for one test."""
    monkeypatch.setenv("DSV4_RETRY_BASE", "0.01")
    with HubServer(root, repo) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server
