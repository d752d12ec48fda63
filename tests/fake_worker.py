"""A hostile ggml-rpc worker on 127.0.0.1: it answers HELLO and the probe's questions the way a test scripts it
(dripping bytes, stalling, announcing absurd device counts, speaking another version), so what `plan --rpc` and
`serve --rpc` do against a peer that misbehaves can be tested without a real server."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

U64 = struct.Struct("<Q")
HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY = 14, 15, 11


@dataclass
class Script:
    version: tuple[int, int, int] = (7, 0, 0)
    devices: int = 1
    drip_s: float = 0.0  # seconds between the bytes of every reply
    memory_delay_s: float = 0.0  # before each memory answer
    silent: bool = False  # accept and never answer


def _send(conn: socket.socket, payload: bytes, script: Script) -> None:
    data = U64.pack(len(payload)) + payload
    if not script.drip_s:
        conn.sendall(data)
        return
    for i in range(len(data)):
        conn.sendall(data[i : i + 1])
        time.sleep(script.drip_s)


def _recv(conn: socket.socket, n: int) -> bytes:
    data = conn.recv(n, socket.MSG_WAITALL)
    if len(data) < n:
        raise ConnectionError
    return data


def _serve(conn: socket.socket, script: Script) -> None:
    if script.silent:
        while conn.recv(1 << 16):
            pass
        return
    while True:
        cmd = _recv(conn, 1)[0]
        (size,) = U64.unpack(_recv(conn, 8))
        _recv(conn, size)
        if cmd == HELLO:
            _send(conn, bytes([*script.version, 0]) + bytes(24), script)
        elif cmd == DEVICE_COUNT:
            _send(conn, struct.pack("<I", script.devices), script)
        elif cmd == GET_DEVICE_MEMORY:
            time.sleep(script.memory_delay_s)
            _send(conn, struct.pack("<QQ", 1 << 30, 2 << 30), script)
        else:
            return


@contextlib.contextmanager
def fake_worker(script: Script) -> Iterator[str]:
    """`host:port` of a worker following `script` for every client, until the block ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            _serve(conn, script)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
