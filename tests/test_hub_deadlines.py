"""Hub servers that stall or overwhelm: one that never answers, answers slowly, goes silent mid-body, sends a gzip
bomb or a listing of 1.5 million files or 20,000 shards. Every Hub read has an overall deadline (DSV4_HUB_TIMEOUT,
set short here) and every answer is bounded before it is decoded, so `plan`/`pull`/`show` of a `REPO:TAG` end with
one line, in time and in bounded memory."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import GGUF_REPO

REPO = "hostile/x-GGUF"
DEADLINE = 1.0
Handler = Callable[[socket.socket, str], None]


@contextlib.contextmanager
def hostile_hub(handle: Handler, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 that reads each request's head and lets `handle(conn, path)` misbehave."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            handle(conn, head.split(b" ", 2)[1].decode())

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("DSV4_HUB_TIMEOUT", str(DEADLINE))
    monkeypatch.setenv("DSV4_RETRY_BASE", "0.05")
    try:
        yield url
    finally:
        listener.close()


def _answer(body: bytes, *, encoding: str | None = None, drip_s: float = 0.0, stop_after: int | None = None) -> Handler:
    def handle(conn: socket.socket, _: str) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        conn.sendall((head + (f"Content-Encoding: {encoding}\r\n" if encoding else "") + "\r\n").encode())
        sent = body[:stop_after] if stop_after is not None else body
        if drip_s:
            for i in range(len(sent)):
                conn.sendall(sent[i : i + 1])
                time.sleep(drip_s)
        else:
            conn.sendall(sent)
        time.sleep(30)  # silent: never finishes

    return handle


def _never(conn: socket.socket, _: str) -> None:
    time.sleep(30)


def _listing(names: list[str]) -> bytes:
    siblings = [{"rfilename": n, "size": 1, "blobId": hashlib.sha1(n.encode()).hexdigest()} for n in names]
    return json.dumps({"id": REPO, "sha": "a" * 40, "siblings": siblings}).encode()


def _one_line_within(dsv4, argv: list[str], seconds: float):
    start = time.monotonic()
    result = dsv4(*argv)
    elapsed = time.monotonic() - start
    assert result.code == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert elapsed < seconds, f"{elapsed:.1f} s"
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    "handle",
    [_never, _answer(_listing(["a.gguf"]), drip_s=0.05), _answer(_listing(["a.gguf"]), stop_after=20)],
    ids=["never-answers", "drips", "silent-mid-body"],
)
@pytest.mark.parametrize("command", ["plan", "pull", "show"])
def test_a_stalling_hub_is_refused_at_the_deadline(dsv4, monkeypatch, handle: Handler, command: str) -> None:
    with hostile_hub(handle, monkeypatch) as url:
        result = _one_line_within(dsv4, [command, f"{REPO}:Q4_K_M"], DEADLINE + 2)
    assert f"{url} did not answer within 1 s" in result.stderr


@pytest.mark.slow
def test_a_gzip_bomb_listing_is_refused_in_bounded_memory(monkeypatch, tmp_path) -> None:
    """1 GiB of JSON whitespace compressed to ~5 MB: refused after 64 MiB decoded, inside a process capped at
    768 MiB of address space (a decoder that inflated the bomb would die of MemoryError instead)."""
    inflate = zlib.compressobj(1, wbits=31)
    zeros = b" " * (16 << 20)
    bomb = b"".join(inflate.compress(zeros) for _ in range(64)) + inflate.flush()
    with hostile_hub(_answer(bomb, encoding="gzip"), monkeypatch):
        probe = (
            "import resource\nresource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))\n"
            "from dsv4cli.hub.api import list_repo\nfrom dsv4cli.errors import Dsv4Error\n"
            f"try:\n    list_repo({REPO!r}, 'main')\nexcept Dsv4Error as e:\n    print(e)\n"
        )
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "larger than 64 MiB decoded; refused" in done.stdout, done.stdout + done.stderr[-2000:]


@pytest.mark.slow
def test_a_listing_of_a_million_and_a_half_files_is_refused_before_decoding(dsv4, monkeypatch) -> None:
    entry = b'{"rfilename":"f%07d.gguf","size":1,"blobId":"%s"},'
    blob = b"0" * 40
    body = b'{"id":"x","sha":"' + b"a" * 40 + b'","siblings":[' + b"".join(entry % (i, blob) for i in range(1_500_000))
    with hostile_hub(_answer(gzip.compress(body + b"{}]}", 1), encoding="gzip"), monkeypatch):
        result = _one_line_within(dsv4, ["plan", f"{REPO}:Q4_K_M"], 10)
    assert "larger than 64 MiB decoded; refused" in result.stderr


@pytest.mark.slow
def test_a_gguf_split_into_20000_shards_is_not_planned_remotely(dsv4, monkeypatch) -> None:
    names = [f"x-Q4_K_M-{i:05d}-of-20000.gguf" for i in range(1, 20001)]
    with hostile_hub(_answer(_listing(names)), monkeypatch):
        result = _one_line_within(dsv4, ["plan", f"{REPO}:Q4_K_M"], 10)
    assert "split into 20000 shards (at most 1024" in result.stderr


@pytest.mark.slow
def test_a_slow_header_read_is_refused_at_the_deadline(dsv4, gguf_hub, monkeypatch) -> None:
    """The listing is quick; the GGUF header trickles in (100 bytes/s): the header reads share one deadline."""
    monkeypatch.setenv("DSV4_HUB_TIMEOUT", str(DEADLINE))
    gguf_hub.faults.bytes_per_second = 100
    result = _one_line_within(dsv4, ["plan", f"{GGUF_REPO}:Q8_0"], DEADLINE + 2)
    assert f"{gguf_hub.url} did not answer within 1 s" in result.stderr


def test_an_honest_hub_within_the_deadline_still_plans(dsv4, gguf_hub, monkeypatch) -> None:
    monkeypatch.setenv("DSV4_HUB_TIMEOUT", "20")
    result = dsv4("plan", f"{GGUF_REPO}:Q8_0")
    assert result.code == 0, result.stderr
