"""The worker's memory budget: a relay in front of `ggml-rpc-server` that the client cannot tell from the server.

The pinned `ggml-rpc-server` has no memory flag: it reports and allocates all of its device's memory. `dsv4 worker`
therefore starts it on a private loopback port and listens on the public one itself, relaying every command
(framing in `protocol.py`) with three changes: GET_DEVICE_MEMORY answers at most the budget left, an ALLOC_BUFFER
beyond the budget is refused as the server refuses one it cannot allocate (a null buffer; llama.cpp then fails the
load naming the RPC device), and HELLO asks for plain TCP (the relay cannot carry an RDMA upgrade). Accounting is
per connection, as the server's own buffers are: it frees them all when the client disconnects.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from dsv4cli.rpc.protocol import (
    ALLOC_REPLY,
    ALLOC_REQUEST,
    CAPS_SIZE,
    MEMORY_REPLY,
    RESPONDS,
    U64,
    Cmd,
    Endpoint,
    recv_exact,
)

CHUNK = 1 << 20
# The requests the relay reads whole to act on, by their exact size.
_INSPECTED = {Cmd.ALLOC_BUFFER: ALLOC_REQUEST.size, Cmd.FREE_BUFFER: U64.size, Cmd.HELLO: CAPS_SIZE}


class BudgetRelay:
    """Accepts clients on `listen` and relays each over its own connection to the server at `upstream`."""

    def __init__(self, listen: Endpoint, upstream: Endpoint, budget: int) -> None:
        self.upstream = upstream
        self.budget = budget
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        self._server = socket.socket(family, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((listen.host, listen.port))
        self._server.listen(8)
        self.port = self._server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def serve_forever(self) -> None:
        """Accept until `close()`; each client gets a thread."""
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        with self._lock:
            for s in list(self._open):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((self.upstream.host, self.upstream.port), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._open |= {client, upstream}
        try:
            _Session(client, upstream, self.budget).run()
        except (OSError, ConnectionError, struct.error):
            pass  # either side went away: the server frees the connection's buffers itself
        finally:
            with self._lock:
                self._open -= {client, upstream}
            client.close()
            upstream.close()


class _Session:
    def __init__(self, client: socket.socket, upstream: socket.socket, budget: int) -> None:
        self.client, self.upstream, self.budget = client, upstream, budget
        self.buffers: dict[int, int] = {}  # remote_ptr -> size, for FREE_BUFFER

    @property
    def allocated(self) -> int:
        return sum(self.buffers.values())

    def run(self) -> None:
        while True:
            head = recv_exact(self.client, 1 + U64.size)
            cmd, (size,) = head[0], U64.unpack(head[1:])
            if _INSPECTED.get(cmd) == size:  # another size is the server's to refuse; it is streamed, not held
                payload = recv_exact(self.client, size)
                if cmd == Cmd.ALLOC_BUFFER and self._over_budget(payload):
                    self.client.sendall(U64.pack(ALLOC_REPLY.size) + ALLOC_REPLY.pack(0, 0))
                    continue
                if cmd == Cmd.FREE_BUFFER:
                    self.buffers.pop(U64.unpack(payload)[0], None)
                if cmd == Cmd.HELLO:
                    payload = bytes(CAPS_SIZE)
                self.upstream.sendall(head + payload)
            else:
                self.upstream.sendall(head)
                _copy(self.client, self.upstream, size)
            if cmd in RESPONDS:
                self._reply(cmd)

    def _over_budget(self, payload: bytes) -> bool:
        _, size = ALLOC_REQUEST.unpack(payload)
        return self.allocated + size > self.budget

    def _reply(self, cmd: int) -> None:
        head = recv_exact(self.upstream, U64.size)
        (size,) = U64.unpack(head)
        if cmd == Cmd.GET_DEVICE_MEMORY and size == MEMORY_REPLY.size:
            free, total = MEMORY_REPLY.unpack(recv_exact(self.upstream, size))
            left = max(self.budget - self.allocated, 0)
            self.client.sendall(head + MEMORY_REPLY.pack(min(free, left), min(total, self.budget)))
        elif cmd == Cmd.ALLOC_BUFFER and size == ALLOC_REPLY.size:
            reply = recv_exact(self.upstream, size)
            ptr, nbytes = ALLOC_REPLY.unpack(reply)
            if ptr:
                self.buffers[ptr] = nbytes
            self.client.sendall(head + reply)
        elif cmd == Cmd.HELLO and size == CAPS_SIZE + 4:
            reply = recv_exact(self.upstream, size)
            self.client.sendall(head + reply[:4] + bytes(CAPS_SIZE))
        else:
            self.client.sendall(head)
            _copy(self.upstream, self.client, size)


def _copy(src: socket.socket, dst: socket.socket, n: int) -> None:
    """Stream `n` bytes (a tensor can be gigabytes) without holding them."""
    while n:
        chunk = src.recv(min(n, CHUNK))
        if not chunk:
            raise ConnectionError("connection closed")
        dst.sendall(chunk)
        n -= len(chunk)
