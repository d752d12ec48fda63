"""llama.cpp's RPC protocol (ggml-rpc) spoken from Python: enough to ask a worker what it offers, and to relay it.

The wire format is the one in `ggml/src/ggml-rpc/ggml-rpc.cpp` of the llama.cpp that llama-cpp-python 0.3.36
vendors (protocol 7.0.0, `ggml/include/ggml-rpc.h`). Every request is `cmd (u8) | size (u64 LE) | payload`; only
the commands in `RESPONDS` get an answer, `size (u64 LE) | payload`. A connection must open with HELLO (24 bytes of
transport capabilities; all zero asks for plain TCP), answered by `major, minor, patch, pad, 24 bytes of caps`.
llama.cpp refuses a server whose major differs or whose minor is newer; so does `probe`.
The server serves one client at a time: a worker that llama-server is using answers nobody else until it is done.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from enum import IntEnum

from dsv4cli.deadline import Deadline, env_seconds
from dsv4cli.errors import Dsv4Error, UsageError

PROTO_MAJOR, PROTO_MINOR = 7, 0
CAPS_SIZE = 24
TIMEOUT_ENV = "DSV4_RPC_TIMEOUT"
PROBE_TIMEOUT_S = 15.0  # the whole probe: connect, handshake, memory, round trips and two 4 MiB transfers
MAX_REPLY = 1 << 20  # nothing a probe asks for answers with more; a bigger size is a stranger, not a worker
MAX_DEVICES = 64  # far above any machine; a worker announcing more is refused before asking each one


class Cmd(IntEnum):
    ALLOC_BUFFER = 0
    GET_ALIGNMENT = 1
    GET_MAX_SIZE = 2
    BUFFER_GET_BASE = 3
    FREE_BUFFER = 4
    BUFFER_CLEAR = 5
    SET_TENSOR = 6
    SET_TENSOR_HASH = 7
    GET_TENSOR = 8
    COPY_TENSOR = 9
    GRAPH_COMPUTE = 10
    GET_DEVICE_MEMORY = 11
    INIT_TENSOR = 12
    GET_ALLOC_SIZE = 13
    HELLO = 14
    DEVICE_COUNT = 15
    GRAPH_RECOMPUTE = 16
    MEMSET_TENSOR = 17


# The commands the server answers (rpc_serve_client's switch: the cases that call send_msg).
RESPONDS = frozenset({
    Cmd.ALLOC_BUFFER, Cmd.GET_ALIGNMENT, Cmd.GET_MAX_SIZE, Cmd.BUFFER_GET_BASE, Cmd.SET_TENSOR_HASH,
    Cmd.GET_TENSOR, Cmd.COPY_TENSOR, Cmd.GET_DEVICE_MEMORY, Cmd.GET_ALLOC_SIZE, Cmd.HELLO, Cmd.DEVICE_COUNT,
})  # fmt: skip
U64 = struct.Struct("<Q")
HELLO_REPLY = struct.Struct(f"<BBBx{CAPS_SIZE}s")
ALLOC_REQUEST = struct.Struct("<IQ")  # device, size
ALLOC_REPLY = struct.Struct("<QQ")  # remote_ptr (0: allocation failed), remote_size
MEMORY_REPLY = struct.Struct("<QQ")  # free, total
# rpc_tensor, packed: id, type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10], view_src, view_offs,
# data, name[64], use_count (296 bytes)
TENSOR = struct.Struct("<QIQ4I4II16ii10QQQQ64si")


class RpcError(Dsv4Error, ConnectionError):
    """A worker that cannot be reached, speaks another protocol version, or broke the protocol."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """`--rpc h1:p1,h2:p2` as llama.cpp's `--rpc` takes it (host up to the first colon, then the port)."""
    endpoints = []
    for part in (p.strip() for p in text.split(",")):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or ":" in host:
            raise UsageError(f"--rpc {part!r}: expected HOST:PORT", hint="e.g. --rpc 192.168.1.10:50052,10.0.0.2:50052")
        endpoints.append(Endpoint(host, int(port)))
    if len(set(endpoints)) != len(endpoints):
        raise UsageError(f"--rpc {text}: a worker is listed twice")
    return tuple(endpoints)


def rpc_timeout() -> float:
    """Seconds one exchange with a worker may take in all (DSV4_RPC_TIMEOUT)."""
    return env_seconds(TIMEOUT_ENV, PROBE_TIMEOUT_S)


def recv_exact(sock: socket.socket, n: int, deadline: Deadline | None = None) -> bytes:
    """`n` bytes; with a deadline, TimeoutError once it passes (however the bytes trickle in)."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            sock.settimeout(deadline.left())
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def request(sock: socket.socket, cmd: Cmd, payload: bytes = b"", deadline: Deadline | None = None) -> bytes | None:
    """Send one command; read and return its reply when the command has one."""
    if deadline is not None:
        sock.settimeout(deadline.left())
    sock.sendall(bytes([cmd]) + U64.pack(len(payload)) + payload)
    if cmd not in RESPONDS:
        return None
    (size,) = U64.unpack(recv_exact(sock, U64.size, deadline))
    if size > MAX_REPLY:
        raise ConnectionError(f"reply of {size} bytes to {cmd.name}")
    return recv_exact(sock, size, deadline)


@dataclass(frozen=True)
class Device:
    free: int
    total: int


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker offers and what reaching it costs."""

    endpoint: Endpoint
    version: tuple[int, int, int]
    devices: tuple[Device, ...]
    rtt_s: float  # one request-reply round trip (median)
    bandwidth_gbs: float  # client-to-worker throughput of a bulk transfer

    def to_dict(self) -> dict[str, object]:
        return {
            "endpoint": str(self.endpoint),
            "version": ".".join(map(str, self.version)),
            "devices": [{"free_bytes": d.free, "total_bytes": d.total} for d in self.devices],
            "rtt_ms": round(self.rtt_s * 1e3, 3),
            "bandwidth_gbs": round(self.bandwidth_gbs, 3),
        }


def hello(sock: socket.socket, where: Endpoint, deadline: Deadline | None = None) -> tuple[int, int, int]:
    """The handshake; a version llama.cpp would refuse is an error naming the worker."""
    reply = request(sock, Cmd.HELLO, bytes(CAPS_SIZE), deadline)
    if reply is None or len(reply) != HELLO_REPLY.size:
        got = len(reply or b"")
        raise RpcError(f"RPC worker {where} answered HELLO with {got} bytes: not a ggml-rpc {PROTO_MAJOR}.x server")
    major, minor, patch, _ = HELLO_REPLY.unpack(reply)
    if major != PROTO_MAJOR or minor > PROTO_MINOR:
        raise RpcError(
            f"RPC worker {where} speaks RPC protocol {major}.{minor}.{patch}; "
            f"this llama.cpp speaks {PROTO_MAJOR}.{PROTO_MINOR}.x",
            hint="run the same dsv4/llama-cpp-python version on every machine (`dsv4 engine build` there)",
        )
    return major, minor, patch


def probe(where: Endpoint, *, timeout: float | None = None, transfer: int = 4 << 20, pings: int = 5) -> WorkerInfo:
    """Ask a worker its protocol version and each device's memory, and time a round trip and a bulk transfer.

    The whole exchange (connect included) is bounded by `timeout` (default DSV4_RPC_TIMEOUT, 15 s): a worker that
    stalls or drips bytes is refused when it passes. The error names the worker and whether it was unreachable,
    busy (the server serves one client at a time), not a ggml-rpc server, or of another protocol version.
    """
    deadline = Deadline(timeout if timeout is not None else rpc_timeout())
    try:
        sock = socket.create_connection((where.host, where.port), timeout=deadline.left())
    except TimeoutError as e:
        raise _late(where, deadline) from e
    except OSError as e:
        raise RpcError(
            f"RPC worker {where} is not reachable ({e.strerror or e})",
            hint=f"start `dsv4 worker --port {where.port}` there, or check the address and firewall",
        ) from e
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            version = hello(sock, where, deadline)
            (count,) = struct.unpack("<I", request(sock, Cmd.DEVICE_COUNT, b"", deadline) or b"\0\0\0\0")
            if count > MAX_DEVICES:
                raise RpcError(f"RPC worker {where} announces {count} devices (at most {MAX_DEVICES} accepted)")
            devices = tuple(_memory(sock, i, deadline) for i in range(count))
            rtts = []
            for _ in range(pings):
                start = time.perf_counter()
                _memory(sock, 0, deadline)
                rtts.append(time.perf_counter() - start)
            rtt = sorted(rtts)[len(rtts) // 2] if rtts else 0.0
            rates = (_transfer_rate(sock, transfer, rtt, deadline) for _ in range(2))
            bandwidth = max(rates, default=0.0) if transfer else 0.0
        except RpcError:
            raise
        except TimeoutError as e:
            raise _late(where, deadline) from e
        except (OSError, struct.error) as e:
            raise RpcError(f"RPC worker {where} broke the protocol ({e}): is it a ggml-rpc server?") from e
    if not devices:
        raise RpcError(f"RPC worker {where} offers no device")
    return WorkerInfo(where, version, devices, rtt, bandwidth)


def _late(where: Endpoint, deadline: Deadline) -> RpcError:
    return RpcError(
        f"RPC worker {where} did not answer within {deadline.seconds:g} s",
        hint=f"it may be serving another client (one at a time), or be slow: stop that llama-server, check the "
        f"worker, or allow more time with {TIMEOUT_ENV}=SECONDS",
    )


def _memory(sock: socket.socket, device: int, deadline: Deadline | None = None) -> Device:
    reply = request(sock, Cmd.GET_DEVICE_MEMORY, struct.pack("<I", device), deadline)
    free, total = MEMORY_REPLY.unpack(reply or b"")
    return Device(free, total)


def _transfer_rate(sock: socket.socket, nbytes: int, rtt: float, deadline: Deadline) -> float:
    """GB/s of one SET_TENSOR of `nbytes` into a scratch buffer on device 0 (freed again), timed to the reply of
    the round trip that follows it, less that round trip."""
    reply = request(sock, Cmd.ALLOC_BUFFER, ALLOC_REQUEST.pack(0, nbytes), deadline)
    ptr, size = ALLOC_REPLY.unpack(reply or b"")
    if not ptr or size < nbytes:
        return 0.0  # the worker has no room for the scratch buffer; the plan falls back to the default
    try:
        (base,) = U64.unpack(request(sock, Cmd.BUFFER_GET_BASE, U64.pack(ptr), deadline) or b"")
        n = nbytes // 4
        tensor = TENSOR.pack(1, 0, ptr, n, 1, 1, 1, 4, nbytes, nbytes, nbytes, 0, *[0] * 16, 0, *[0] * 10, 0, 0,
                             base, b"dsv4-probe", 0)  # fmt: skip
        payload = tensor + b"\0" + U64.pack(0) + bytes(nbytes)
        start = time.perf_counter()
        request(sock, Cmd.SET_TENSOR, payload, deadline)
        _memory(sock, 0, deadline)
        elapsed = max(time.perf_counter() - start - rtt, 1e-6)
    finally:
        request(sock, Cmd.FREE_BUFFER, U64.pack(ptr), deadline)
    return nbytes / elapsed / 1e9
