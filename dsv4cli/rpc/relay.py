"""The worker's memory budget and its guard: a relay in front of `ggml-rpc-server` that the client cannot tell from
the server, and that lets through only what the server can take.

The pinned `ggml-rpc-server` has no memory flag, trusts what each request says about sizes and tensors, and
serves one client at a time. `dsv4 worker --mem` therefore starts it where only the relay can reach it (`Upstream`:
a private network namespace, `netns.py`) and relays every request, parsed and checked first (`messages.py`):
- GET_DEVICE_MEMORY answers at most the budget left; an ALLOC_BUFFER beyond the budget, or beyond MAX_BUFFERS
  live buffers, is refused as the server refuses one it cannot allocate (a null buffer; llama.cpp then fails the
  load naming the RPC device); HELLO asks for plain TCP (the relay cannot carry an RDMA upgrade).
- A request naming a device, buffer or tensor region the client does not have, a malformed graph, or a size the
  layout does not allow is refused before it reaches the server, and the client is disconnected (what the server
  itself does on a bad request). SET_TENSOR and GET_TENSOR are split into pieces of at most PIECE bytes, so the
  server never reserves a declared size the relay has not checked, or more than PIECE at once.
- Clients take turns, as at the server. A client must finish HELLO, and every message it starts, in time
  (DSV4_RPC_IDLE_TIMEOUT plus a second per MiB); one that holds no buffer and sends nothing for that long is
  disconnected, so it cannot keep the next one out. One that holds buffers keeps its turn (llama-server between
  requests looks the same).
Accounting is per connection, as the server's own buffers are: it frees them all when the client disconnects.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

from dsv4cli.deadline import Deadline, env_seconds
from dsv4cli.rpc.buffered import Inbox, Outbox
from dsv4cli.rpc.messages import (
    FIXED,
    MAX_BUFFERS,
    MAX_GRAPH_BYTES,
    SET_HEADER,
    TENSOR_SIZE,
    Buffer,
    Refused,
    Session,
    check_fixed,
    check_graph,
    check_set_tensor,
)
from dsv4cli.rpc.netns import connect_in
from dsv4cli.rpc.protocol import (
    ALLOC_REPLY,
    ALLOC_REQUEST,
    CAPS_SIZE,
    MEMORY_REPLY,
    RESPONDS,
    U64,
    Cmd,
    Endpoint,
)

PIECE = 8 << 20
IDLE_ENV = "DSV4_RPC_IDLE_TIMEOUT"
IDLE_TIMEOUT_S = 30.0
MIN_RATE = 1 << 20  # bytes per second a client must keep up within a message
MAX_CLIENTS = 32  # connections held at once (one served, the others waiting their turn)
CONNECT_TIMEOUT_S = 10.0  # the server may be restarting
REQUEST_HEAD = struct.Struct("<BQ")  # command, payload size
SET_OFFSET = struct.Struct("<BQ")  # SET_TENSOR's cache flag and offset, after its rpc_tensor


class Upstream:
    """How the relay reaches the server: a loopback endpoint, inside the server's network namespace when it has
    one (`netns`: /proc/PID/ns/net), so nothing else on this machine can."""

    def __init__(self, endpoint: Endpoint, netns: str | None = None) -> None:
        self.endpoint, self.netns = endpoint, netns  # both replaced when the worker restarts the server

    def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
        """A connection to the server, retried while it (re)starts, until `timeout`."""
        deadline = Deadline(timeout)
        while True:
            endpoint, netns = self.endpoint, self.netns
            try:
                address = (endpoint.host, endpoint.port)
                if netns is None:
                    return socket.create_connection(address, timeout=deadline.left())
                return connect_in(netns, address, deadline.left())
            except (ConnectionRefusedError, FileNotFoundError):  # not listening yet, or its namespace is gone
                time.sleep(min(0.05, deadline.left()))


class BudgetRelay:
    """Accepts clients on `listen` and relays each, in turn, over its own connection to the server."""

    def __init__(
        self, listen: Endpoint, upstream: Upstream, budget: int, *, devices: int = 1, note: Callable[[str], None]
    ) -> None:
        self.upstream = upstream
        self.budget, self.devices, self.note = budget, devices, note
        self.idle_s = env_seconds(IDLE_ENV, IDLE_TIMEOUT_S)
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        self._server = socket.socket(family, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((listen.host, listen.port))
        self._server.listen(8)
        self.port = self._server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._turn = threading.Lock()  # the server serves one client at a time; so does the relay
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def serve_forever(self) -> None:
        """Accept until `close()`; each client gets a thread (at most MAX_CLIENTS; more are closed at once)."""
        while True:
            try:
                client, peer = self._server.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client, peer), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        with self._lock:
            for s in list(self._open):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _track(self, *socks: socket.socket, add: bool) -> None:
        with self._lock:
            self._open = self._open | set(socks) if add else self._open - set(socks)

    def _serve(self, client: socket.socket, peer: object) -> None:
        who = _peer(peer)
        self._track(client, add=True)
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            inbox = Inbox(client)
            caps = _hello(inbox, self.idle_s)
            with self._turn:
                try:
                    upstream = self.upstream.connect()
                except (OSError, TimeoutError) as e:
                    self.note(f"relay: cannot reach ggml-rpc-server for {who} ({e})")
                    return
                self._track(upstream, add=True)
                try:
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    session = Session(devices=self.devices)
                    _Relayed(client, inbox, upstream, self.budget, session, self.idle_s).run(caps)
                finally:
                    self._track(upstream, add=False)
                    upstream.close()
        except Refused as e:
            self.note(f"relay: refused a request from {who}: {e}; disconnected it")
        except TimeoutError:
            self.note(f"relay: {who} stalled for more than {self.idle_s:g} s ({IDLE_ENV}); disconnected it")
        except (OSError, ConnectionError, struct.error):
            pass  # either side went away: the server frees the connection's buffers itself
        finally:
            self._track(client, add=False)
            client.close()
            self._slots.release()


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return str(peer)


def _hello(client: Inbox, idle_s: float) -> bytes:
    """The client's HELLO (the first message, in time and of the exact size), read before its turn."""
    deadline = Deadline(idle_s)
    head = client.take(1 + U64.size, deadline)
    if head[0] != Cmd.HELLO or U64.unpack_from(head, 1)[0] != CAPS_SIZE:
        raise Refused("the connection did not open with HELLO")
    return client.take(CAPS_SIZE, deadline)


class _Relayed:
    """One client's turn at the server. What it forwards waits in `out` until the relay would wait (`buffered.py`)."""

    def __init__(
        self, client: socket.socket, inbox: Inbox, upstream: socket.socket, budget: int, session: Session, idle_s: float
    ) -> None:
        self.client, self.budget, self.session, self.idle_s = client, budget, session, idle_s
        upstream.settimeout(None)
        self.out, self.answers = Outbox(upstream), Outbox(client)
        self.inbox, inbox.before_wait = inbox, self.out.flush
        self.replies = Inbox(upstream, self.out.flush)

    def run(self, caps: bytes) -> None:
        del caps  # the client's transport capabilities: the relay only carries plain TCP
        self._send(Cmd.HELLO, bytes(CAPS_SIZE))
        reply = self._reply_bytes()
        self.client.sendall(U64.pack(len(reply)) + reply[:4] + bytes(len(reply) - 4))
        while True:
            if not self.inbox.buffered():
                self._wait_for_request()
            cmd, size = REQUEST_HEAD.unpack(self.inbox.take(REQUEST_HEAD.size, self.idle_s))
            self._one(cmd, size)

    def _wait_for_request(self) -> None:
        """Wait for the next request's first byte: forever while the client holds buffers, else at most the idle
        time."""
        while True:
            try:
                self.inbox.wait(self.idle_s)
                return
            except TimeoutError:
                if not self.session.buffers:
                    raise

    def _one(self, cmd: int, size: int) -> None:
        """One request, whose head has just been read: checked, then forwarded or answered."""
        if cmd == Cmd.SET_TENSOR:  # the most frequent: a dozen or more per token
            if size < SET_HEADER:
                raise Refused(f"SET_TENSOR of {size} bytes, shorter than its header")
            if size - SET_HEADER <= PIECE and self.inbox.buffered() >= size:  # all here: nothing to wait for
                self._set_whole(self.inbox.take(size))
                return
            deadline = self._deadline(size)
            header = self.inbox.take(SET_HEADER, self.idle_s)  # checked before the data is read
            offset = check_set_tensor(header, size - SET_HEADER, self.session)
            self._set_in_pieces(header, offset, size - SET_HEADER, deadline)
        elif cmd in FIXED and cmd != Cmd.HELLO:
            if size != FIXED[Cmd(cmd)]:
                raise Refused(f"{Cmd(cmd).name} of {size} bytes; its layout has {FIXED[Cmd(cmd)]}")
            payload = self.inbox.take(size, self._deadline(size))
            self._fixed(Cmd(cmd), payload)
        elif cmd == Cmd.GRAPH_COMPUTE:
            if size > MAX_GRAPH_BYTES:
                raise Refused(f"GRAPH_COMPUTE of {size} bytes (at most {MAX_GRAPH_BYTES})")
            payload = self.inbox.take(size, self._deadline(size))
            check_graph(payload, self.session)
            self._send(cmd, payload)
        else:
            raise Refused(f"command {cmd} (unknown here, or HELLO again)")

    def _deadline(self, size: int) -> Deadline:
        """The whole message within the idle time plus a second per MiB, from its head (read just before: nothing
        has waited since)."""
        return Deadline(self.idle_s + size / MIN_RATE)

    def _fixed(self, cmd: Cmd, payload: bytes) -> None:
        check_fixed(cmd, payload, self.session)
        if cmd == Cmd.ALLOC_BUFFER:
            self._alloc(payload)
        elif cmd == Cmd.GET_TENSOR:
            self._get_in_pieces(payload)
        elif cmd == Cmd.GET_DEVICE_MEMORY:
            self._send(cmd, payload)
            free, total = MEMORY_REPLY.unpack(self._reply_bytes(MEMORY_REPLY.size))
            left = max(self.budget - self.session.allocated, 0)
            self._answer(MEMORY_REPLY.pack(min(free, left), min(total, self.budget)))
        else:
            self._send(cmd, payload)
            if cmd == Cmd.FREE_BUFFER:
                self.session.buffers.pop(U64.unpack(payload)[0], None)
            if cmd in RESPONDS:
                self._answer(self._reply_bytes())

    def _alloc(self, payload: bytes) -> None:
        _, size = ALLOC_REQUEST.unpack(payload)
        if self.session.allocated + size > self.budget or len(self.session.buffers) >= MAX_BUFFERS:
            self._answer(ALLOC_REPLY.pack(0, 0))
            return
        self._send(Cmd.ALLOC_BUFFER, payload)
        reply = self._reply_bytes(ALLOC_REPLY.size)
        ptr, nbytes = ALLOC_REPLY.unpack(reply)
        if ptr:
            self._send(Cmd.BUFFER_GET_BASE, U64.pack(ptr))
            (base,) = U64.unpack(self._reply_bytes(U64.size))
            self.session.buffers[ptr] = Buffer(base, nbytes)
        self._answer(reply)

    def _set_whole(self, payload: bytes) -> None:
        """A SET_TENSOR that has arrived whole (nothing to wait for) and fits in one piece: the same checks, and
        forwarded as it is unless its cache flag must be cleared (`_set_in_pieces` sends what this sends)."""
        offset = check_set_tensor(payload, len(payload) - SET_HEADER, self.session)
        if payload[TENSOR_SIZE]:
            payload = payload[:TENSOR_SIZE] + SET_OFFSET.pack(0, offset) + payload[SET_HEADER:]
        self._send(Cmd.SET_TENSOR, payload)

    def _set_in_pieces(self, header: bytes, offset: int, n: int, deadline: Deadline) -> None:
        tensor = header[:TENSOR_SIZE]
        done = 0
        while True:
            piece = self.inbox.take(min(n - done, PIECE), deadline)
            self.out.write(
                REQUEST_HEAD.pack(Cmd.SET_TENSOR, SET_HEADER + len(piece)),
                tensor,
                SET_OFFSET.pack(0, offset + done),
                piece,
            )
            done += len(piece)
            if done >= n:
                return

    def _get_in_pieces(self, payload: bytes) -> None:
        tensor = payload[:TENSOR_SIZE]
        offset, n = struct.unpack_from("<QQ", payload, TENSOR_SIZE)
        self.answers.write(U64.pack(n))  # goes with the first piece: one write, one wake-up of the client
        done = 0
        while True:
            length = min(n - done, PIECE)
            self._send(Cmd.GET_TENSOR, tensor + struct.pack("<QQ", offset + done, length))
            self.answers.write(self._reply_bytes(length))
            done += length
            if done >= n:
                self.answers.flush()
                return

    def _send(self, cmd: int, payload: bytes) -> None:
        self.out.write(REQUEST_HEAD.pack(cmd, len(payload)), payload)

    def _reply_bytes(self, expected: int | None = None) -> bytes:
        (size,) = U64.unpack(self.replies.take(U64.size))
        if size > max(expected or 0, CAPS_SIZE + 4, PIECE):
            raise ConnectionError(f"the server answered with {size} bytes")
        return self.replies.take(size)

    def _answer(self, reply: bytes) -> None:
        self.answers.write(U64.pack(len(reply)), reply)
        self.answers.flush()
