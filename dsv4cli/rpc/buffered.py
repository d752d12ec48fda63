"""Buffered socket reads and writes for the relay, so its cost per decoded token stays near a plain forwarder's.

llama.cpp sends a worker dozens of small requests per token (SET_TENSOR of a few KB each, GRAPH_RECOMPUTE)
back to back, then waits for one answer. Read one at a time, each costs the relay several system calls and a
thread wake-up; `Inbox` reads what has arrived in one call and hands out messages from memory, and `Outbox`
collects what the relay forwards and sends it in one call whenever the relay is about to wait (for the client
or for an answer), so nothing the server should have is held back while the relay is idle.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from dsv4cli.deadline import Deadline

READ_AHEAD = 64 << 10  # one read takes up to this much; a larger message is read straight into its own buffer
RECV_MAX = 1 << 20  # one read of a large message
SEND_AT = 64 << 10  # collected writes are sent once they reach this much


def _nothing() -> None:
    return None


class Outbox:
    """Writes to `sock`, collected until `flush()` (or SEND_AT bytes); a large part goes out as it is."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._pending = bytearray()

    def write(self, *parts: bytes) -> None:
        for part in parts:
            if len(part) >= SEND_AT:
                self.flush()
                self.sock.sendall(part)
            else:
                self._pending += part
        if len(self._pending) >= SEND_AT:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.sock.sendall(self._pending)
            self._pending.clear()


class Inbox:
    """Reads from `sock` with read-ahead; `before_wait` runs before every read that may block (to flush an
    `Outbox`). Each read is bounded by the deadline it is given (None: no bound), as `protocol.recv_exact`."""

    def __init__(self, sock: socket.socket, before_wait: Callable[[], None] = _nothing) -> None:
        self.sock, self.before_wait = sock, before_wait
        self._buf = bytearray()
        self._pos = 0
        self._timeout: float | None = -1.0  # unknown: the first read sets it

    def wait(self, timeout: float | None) -> None:
        """Until a byte has arrived; TimeoutError after `timeout` seconds without one."""
        if self._pos == len(self._buf):
            self._fill(timeout)

    def buffered(self) -> int:
        """Bytes that have arrived and are not taken yet."""
        return len(self._buf) - self._pos

    def take(self, n: int, within: Deadline | float | None = None) -> bytes:
        """The next `n` bytes; TimeoutError once the deadline passes (`within` seconds from now: a Deadline made
        at the first wait, since nothing happens before it), ConnectionError if the peer closes first."""
        if len(self._buf) - self._pos < n:
            deadline = Deadline(within) if isinstance(within, (int, float)) else within
            if n > READ_AHEAD:
                return self._take_large(n, deadline)
            while len(self._buf) - self._pos < n:
                self._fill(None if deadline is None else deadline.left())
        start = self._pos
        self._pos += n
        return bytes(self._buf[start : self._pos])

    def _fill(self, timeout: float | None) -> None:
        self.before_wait()
        if self._pos:
            del self._buf[: self._pos]  # cheap at the front of a bytearray
            self._pos = 0
        self._settimeout(timeout)
        chunk = self.sock.recv(READ_AHEAD)
        if not chunk:
            raise ConnectionError("connection closed")
        self._buf += chunk

    def _take_large(self, n: int, deadline: Deadline | None) -> bytes:
        out = bytearray(n)
        got = min(len(self._buf) - self._pos, n)
        out[:got] = self._buf[self._pos : self._pos + got]
        self._pos += got
        with memoryview(out) as view:
            while got < n:
                self.before_wait()
                self._settimeout(None if deadline is None else deadline.left())
                count = self.sock.recv_into(view[got:], min(n - got, RECV_MAX))
                if not count:
                    raise ConnectionError("connection closed")
                got += count
        return out  # type: ignore[return-value]  # a bytearray: the callers only read it

    def _settimeout(self, timeout: float | None) -> None:
        if timeout is None and self._timeout is None:
            return
        self.sock.settimeout(timeout)
        self._timeout = timeout
