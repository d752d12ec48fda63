"""Hostile RPC peers: workers that stall, drip bytes, announce absurd device counts or speak another version
(against `plan --rpc` and `serve --rpc`'s probe), and clients that try to get past `dsv4 worker --mem`'s budget or
crash its ggml-rpc-server (against the real relay and server from the engine build)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from dsv4cli.rpc.protocol import (
    ALLOC_REPLY,
    ALLOC_REQUEST,
    TENSOR,
    U64,
    Cmd,
    RpcError,
    hello,
    parse_endpoints,
    probe,
    request,
)
from dsv4cli.units import GIB
from tests.fake_worker import Script, fake_worker

DEADLINE = "1"


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSV4_RPC_TIMEOUT", DEADLINE)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [Script(drip_s=0.1), Script(memory_delay_s=5), Script(silent=True), Script(devices=3, drip_s=0.02)],
    ids=["drip", "slow-memory", "silent", "slow-devices"],
)
def test_a_stalling_worker_is_refused_at_the_deadline(short_deadline, script: Script) -> None:
    with fake_worker(script) as address:
        start = time.monotonic()
        with pytest.raises(RpcError, match=rf"RPC worker {address} did not answer within 1 s") as e:
            probe(parse_endpoints(address)[0])
        assert time.monotonic() - start < 2.5
        assert "DSV4_RPC_TIMEOUT" in (e.value.hint or "")


def test_a_worker_announcing_four_billion_devices_is_refused_at_once(short_deadline) -> None:
    with fake_worker(Script(devices=2**32 - 1)) as address:
        start = time.monotonic()
        with pytest.raises(RpcError, match=r"announces 4294967295 devices \(at most 64 accepted\)"):
            probe(parse_endpoints(address)[0])
        assert time.monotonic() - start < 1


def test_a_version_mismatch_keeps_its_message_and_hint() -> None:
    with fake_worker(Script(version=(8, 1, 0))) as address, pytest.raises(RpcError) as e:
        probe(parse_endpoints(address)[0])
    assert str(e.value) == f"RPC worker {address} speaks RPC protocol 8.1.0; this llama.cpp speaks 7.0.x"
    assert "same dsv4/llama-cpp-python version" in (e.value.hint or "")


@pytest.mark.slow
@pytest.mark.parametrize("script", [Script(drip_s=0.1), Script(devices=2**32 - 1)], ids=["drip", "devices"])
def test_plan_rpc_against_a_hostile_worker_is_one_line_within_the_deadline(
    dsv4, tiny_gguf, short_deadline, script: Script
) -> None:
    with fake_worker(script) as address:
        start = time.monotonic()
        result = dsv4("plan", str(tiny_gguf), "--rpc", address)
        assert time.monotonic() - start < 5
    assert result.code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"RPC worker {address}" in result.stderr


@pytest.mark.slow
def test_serve_rpc_check_refuses_a_dripping_worker_within_the_deadline(short_deadline) -> None:
    from dsv4cli.rpc.health import check_workers

    with fake_worker(Script(drip_s=0.1)) as address:
        start = time.monotonic()
        with pytest.raises(RpcError, match="did not answer within 1 s"):
            check_workers(address)
        assert time.monotonic() - start < 2.5


def test_a_bad_timeout_setting_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv4cli.errors import UsageError
    from dsv4cli.rpc.protocol import rpc_timeout

    for bad in ("0", "-1", "nan", "soon", "inf"):
        monkeypatch.setenv("DSV4_RPC_TIMEOUT", bad)
        with pytest.raises(UsageError, match="DSV4_RPC_TIMEOUT"):
            rpc_timeout()


# --- clients against `dsv4 worker --mem`: the real relay in front of the real ggml-rpc-server --------------------

BUDGET_GIB = 0.25


@pytest.fixture
def worker(engine, tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A budgeted worker serving in a thread (restarts included), with the lines it would print."""
    from dsv4cli.rpc.worker import WorkerOptions, start_worker

    monkeypatch.setenv("DSV4_RPC_IDLE_TIMEOUT", "1")
    notes: list[str] = []
    running = start_worker(WorkerOptions(port=0, mem_gib=BUDGET_GIB, threads=1), engine, note=notes.append)
    running.notes = notes
    threading.Thread(target=running.serve_forever, daemon=True).start()
    yield running
    running.stop()


def _rss_mib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) // 1024


def _listening_ports(tcp_table: str) -> set[int]:
    rows = [line.split() for line in Path(tcp_table).read_text().splitlines()[1:]]
    return {int(row[1].split(":")[1], 16) for row in rows if row[3] == "0A"}


class Client:
    """A raw ggml-rpc client of the relay."""

    def __init__(self, worker) -> None:
        where = parse_endpoints(worker.address)[0]
        self.sock = socket.create_connection((where.host, where.port), timeout=5)
        hello(self.sock, where)

    def alloc(self, size: int) -> tuple[int, int]:
        ptr, _ = ALLOC_REPLY.unpack(request(self.sock, Cmd.ALLOC_BUFFER, ALLOC_REQUEST.pack(0, size)))
        base = U64.unpack(request(self.sock, Cmd.BUFFER_GET_BASE, U64.pack(ptr)))[0] if ptr else 0
        return ptr, base

    def closed_by_peer(self, within: float = 3.0) -> bool:
        self.sock.settimeout(within)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def tensor(buffer: int, data: int, n: int, *, op: int = 0, src: tuple[int, ...] = (), tid: int = 1) -> bytes:
    """An f32 vector of n elements at `data` in `buffer`."""
    srcs = [*src, *[0] * (10 - len(src))]
    return TENSOR.pack(tid, 0, buffer, n, 1, 1, 1, 4, 4 * n, 4 * n, 4 * n, op, *[0] * 16, 0, *srcs, 0, 0, data,
                       b"t", 0)  # fmt: skip


def _survived(worker, pid: int) -> None:
    assert worker.process.pid == pid and worker.process.proc.poll() is None, worker.notes
    assert probe(parse_endpoints(worker.address)[0], transfer=0, pings=1).devices


def test_the_server_is_reachable_only_through_the_relay(worker) -> None:
    """ggml-rpc-server listens in a network namespace of its own: this machine's loopback has no way to it."""
    import os

    assert os.readlink(f"/proc/{worker.process.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert worker.launcher.server.port in _listening_ports(f"/proc/{worker.process.pid}/net/tcp")
    assert parse_endpoints(worker.address)[0].port in _listening_ports("/proc/self/net/tcp")  # the relay, here
    assert not worker.notes


@pytest.mark.parametrize("cmd", [Cmd.SET_TENSOR, Cmd.GRAPH_COMPUTE])
def test_a_declared_2gib_message_is_refused_before_the_server_reserves_it(worker, cmd: Cmd) -> None:
    pid, before = worker.process.pid, _rss_mib(worker.process.pid)
    client = Client(worker)
    ptr, base = client.alloc(1 << 20)
    head = bytes([cmd]) + U64.pack(2 << 30)
    body = tensor(ptr, base, 1024) + b"\0" + U64.pack(0) if cmd == Cmd.SET_TENSOR else b""
    client.sock.sendall(head + body)
    assert client.closed_by_peer()
    assert _rss_mib(pid) - before < 64
    _survived(worker, pid)
    assert any("refused a request" in n for n in worker.notes)


def test_allocations_are_capped_in_number(worker) -> None:
    from dsv4cli.rpc.messages import MAX_BUFFERS

    client = Client(worker)
    got = [client.alloc(0)[0] for _ in range(MAX_BUFFERS + 50)]
    assert sum(1 for p in got if p) == MAX_BUFFERS
    assert got[-1] == 0


def _graph(nodes: list[int], tensors: list[bytes]) -> bytes:
    return struct.pack("<II", 0, len(nodes)) + struct.pack(f"<{len(nodes)}Q", *nodes) + struct.pack(
        "<I", len(tensors)) + b"".join(tensors)  # fmt: skip


def _chain(p: int, b: int, n: int) -> bytes:
    """A graph whose one node has a chain of n sources (each tensor the source of the next)."""
    return _graph([n], [tensor(p, b, 1, op=1, src=(i - 1,) if i > 1 else (), tid=i) for i in range(1, n + 1)])


NO_SRCS = bytes(10 * TENSOR.size)
MALFORMED = {
    "set-past-buffer-end": lambda p, b: (Cmd.SET_TENSOR, tensor(p, b + 4032, 1024) + b"\0" + U64.pack(0) + bytes(64)),
    "set-past-tensor-end": lambda p, b: (Cmd.SET_TENSOR, tensor(p, b, 16) + b"\0" + U64.pack(60) + bytes(64)),
    "get-past-tensor-end": lambda p, b: (Cmd.GET_TENSOR, tensor(p, b, 16) + struct.pack("<QQ", 0, 4096)),
    "unknown-buffer": lambda p, b: (Cmd.GET_TENSOR, tensor(p + 8, b, 16) + struct.pack("<QQ", 0, 4)),
    "copy-past-end": lambda p, b: (Cmd.COPY_TENSOR, tensor(p, b, 1024) + tensor(p, b + 2048, 16)),
    "init-past-end": lambda p, b: (Cmd.INIT_TENSOR, tensor(p, b + 4000, 1024)),
    "alloc-size-past-end": lambda p, b: (Cmd.GET_ALLOC_SIZE, struct.pack("<I", 0) + tensor(p, b, 1 << 20) + NO_SRCS),
    "null-graph-node": lambda p, b: (Cmd.GRAPH_COMPUTE, _graph([0], [tensor(p, b, 16)])),
    "graph-node-not-sent": lambda p, b: (Cmd.GRAPH_COMPUTE, _graph([7], [tensor(p, b, 16)])),
    "custom-op": lambda p, b: (Cmd.GRAPH_COMPUTE, _graph([1], [tensor(p, b, 16, op=95)])),
    "deep-sources": lambda p, b: (Cmd.GRAPH_COMPUTE, _chain(p, b, 5000)),
    "bad-device": lambda p, b: (Cmd.GET_DEVICE_MEMORY, struct.pack("<I", 7)),
    "hello-again": lambda p, b: (Cmd.HELLO, bytes(24)),
    "unknown-command": lambda p, b: (99, b""),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_request_is_refused_and_the_server_lives(worker, case: str) -> None:
    pid = worker.process.pid
    client = Client(worker)
    ptr, base = client.alloc(4096)
    cmd, payload = MALFORMED[case](ptr, base)
    client.sock.sendall(bytes([cmd]) + U64.pack(len(payload)) + payload)
    assert client.closed_by_peer()
    _survived(worker, pid)
    assert any("refused a request" in n for n in worker.notes), worker.notes


def test_an_idle_client_does_not_keep_the_next_one_out(worker) -> None:
    where = parse_endpoints(worker.address)[0]
    silent = socket.create_connection((where.host, where.port))  # sends nothing at all
    idle = Client(worker)  # HELLO, then nothing, holding no buffer
    start = time.monotonic()
    assert probe(where, transfer=0, pings=1, timeout=10).devices
    assert time.monotonic() - start < 5
    assert idle.closed_by_peer() and silent.recv(1) == b""
    assert any("stalled" in n for n in worker.notes)


def test_a_slow_client_mid_message_is_cut_off(worker) -> None:
    client = Client(worker)
    client.sock.sendall(bytes([Cmd.GET_DEVICE_MEMORY]) + U64.pack(4) + b"\0")  # 3 bytes short, then silence
    assert client.closed_by_peer(within=4)
    assert probe(parse_endpoints(worker.address)[0], transfer=0, pings=1).devices


def test_a_dead_server_is_restarted_and_said_so(worker) -> None:
    import os
    import signal

    old = worker.process.pid
    os.kill(old, signal.SIGSEGV)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any("restarted" in n for n in worker.notes):
        time.sleep(0.1)
    assert any("was killed by SIGSEGV" in n and "restarting it" in n for n in worker.notes), worker.notes
    assert worker.process.pid != old
    info = probe(parse_endpoints(worker.address)[0], transfer=0, pings=1)
    assert info.devices[0].free == int(BUDGET_GIB * GIB)
