"""Seeded fuzzing of the relay's ggml-rpc message checks (`dsv4cli.rpc.messages`), in process and through a real
`dsv4 worker --mem`.

Requests are built from valid templates of every command with one lie each (a field set to an edge value, a
flipped byte, a truncated or extended payload). In process, every check must end in "accepted" or `Refused`, and
every tensor it accepts must lie inside one of the session's buffers by an independent reference (plain integer
ggml_nbytes). Through the worker, the same lies against the real ggml-rpc-server must never kill it.
"""

from __future__ import annotations

import random
import struct
import threading

import pytest

from dsv4cli.rpc.messages import (
    FIXED,
    TENSOR_SIZE,
    TYPE_SIZES,
    Buffer,
    Refused,
    Session,
    check_fixed,
    check_graph,
    check_set_tensor,
)
from dsv4cli.rpc.protocol import TENSOR, U64, Cmd
from tests.test_rpc_hostile import Client, _graph, _survived, tensor, worker  # noqa: F401 - fixtures

pytestmark = pytest.mark.fuzz

SEED = 20261127
CASES = 3000
SERVER_CASES = 150
EDGES = [0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]
BASE, SIZE = 0x7F0000000000, 1 << 20


def reference_nbytes(fields: tuple) -> int:
    """ggml_nbytes (ggml.c) in Python integers, for an unpacked rpc_tensor."""
    ttype, ne, nb = fields[1], fields[3:7], fields[7:11]
    if any(n == 0 for n in ne):
        return 0
    block, size = TYPE_SIZES[ttype]
    total = size + (ne[0] - 1) * nb[0] if block == 1 else ne[0] * nb[0] // block
    return total + sum((ne[i] - 1) * nb[i] for i in range(1, 4))


def inside(raw: bytes, session: Session) -> bool:
    fields = TENSOR.unpack(raw)
    buffer, data = fields[2], fields[-3]
    if buffer == 0:
        return data == 0
    b = session.buffers[buffer]
    return b.base <= data and data + reference_nbytes(fields) <= b.base + b.size


def _lie(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    kind = rng.randrange(4)
    if kind == 0 and data:  # one field of 4 or 8 bytes set to an edge value
        width = rng.choice((4, 8))
        at = rng.randrange(0, max(len(data) - width, 0) + 1)
        data[at : at + width] = (rng.choice(EDGES) % (1 << (8 * width))).to_bytes(width, "little")
    elif kind == 1 and data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 2:
        del data[rng.randrange(len(data) + 1) :]
    else:
        data += bytes(rng.randrange(1, 400))
    return bytes(data)


def templates(ptr: int, base: int) -> list[tuple[Cmd, bytes]]:
    t = tensor(ptr, base, 64)
    return [
        (Cmd.ALLOC_BUFFER, struct.pack("<IQ", 0, 4096)),
        (Cmd.BUFFER_CLEAR, U64.pack(ptr) + b"\0"),
        (Cmd.GET_TENSOR, t + struct.pack("<QQ", 0, 256)),
        (Cmd.MEMSET_TENSOR, t + struct.pack("<QQB", 0, 256, 7)),
        (Cmd.SET_TENSOR_HASH, t + struct.pack("<QQ", 0, 1)),
        (Cmd.COPY_TENSOR, t + tensor(ptr, base + 1024, 64)),
        (Cmd.INIT_TENSOR, t),
        (Cmd.GET_ALLOC_SIZE, struct.pack("<I", 0) + t + bytes(10 * TENSOR_SIZE)),
        (Cmd.SET_TENSOR, t + b"\0" + U64.pack(0) + bytes(256)),
        (Cmd.GRAPH_COMPUTE, _graph([2], [tensor(ptr, base, 64, tid=1), tensor(ptr, base + 512, 64, src=(1,), tid=2)])),
    ]


def check(cmd: Cmd, payload: bytes, session: Session) -> None:
    """What the relay checks of one request (raises Refused), as `_Relayed._one` applies them."""
    if cmd in FIXED:
        if len(payload) != FIXED[cmd]:
            raise Refused("size")
        check_fixed(cmd, payload, session)
    elif cmd == Cmd.SET_TENSOR:
        if len(payload) < TENSOR_SIZE + 9:
            raise Refused("size")
        check_set_tensor(payload[: TENSOR_SIZE + 9], len(payload) - TENSOR_SIZE - 9, session)
    else:
        check_graph(payload, session)


def test_the_parser_only_accepts_or_refuses_and_accepts_only_what_lies_inside() -> None:
    rng = random.Random(SEED)
    session = Session(devices=1, buffers={0x1000: Buffer(BASE, SIZE)})
    outcomes = {"accepted": 0, "refused": 0}
    for _ in range(CASES):
        cmd, payload = rng.choice(templates(0x1000, BASE))
        payload = _lie(rng, payload)
        try:
            check(cmd, payload, session)
        except Refused:
            outcomes["refused"] += 1
            continue
        outcomes["accepted"] += 1
        if cmd in (Cmd.GET_TENSOR, Cmd.MEMSET_TENSOR, Cmd.SET_TENSOR_HASH, Cmd.INIT_TENSOR, Cmd.SET_TENSOR):
            assert inside(payload[:TENSOR_SIZE], session), (cmd.name, payload.hex())
        if cmd == Cmd.COPY_TENSOR:
            assert inside(payload[:TENSOR_SIZE], session) and inside(payload[TENSOR_SIZE:], session)
    assert outcomes["accepted"] > CASES // 10 and outcomes["refused"] > CASES // 10, outcomes


def test_lies_through_the_relay_never_kill_the_server(worker) -> None:  # noqa: F811 - the fixture
    rng = random.Random(SEED + 1)
    pid = worker.process.pid
    for _ in range(SERVER_CASES):
        client = Client(worker)
        ptr, base = client.alloc(4096)
        cmd, payload = rng.choice(templates(ptr, base))
        payload = _lie(rng, payload)
        client.sock.sendall(bytes([cmd]) + U64.pack(len(payload)) + payload)
        threading.Thread(target=client.sock.close, daemon=True).start()
    _survived(worker, pid)
    assert not any("restart" in n for n in worker.notes), worker.notes


@pytest.mark.parametrize("seed", range(3))
def test_a_random_byte_stream_is_refused_without_a_crash(worker, seed: int) -> None:  # noqa: F811
    rng = random.Random(SEED + 10 + seed)
    pid = worker.process.pid
    client = Client(worker)
    client.sock.sendall(bytes(rng.randrange(256) for _ in range(4096)))
    client.sock.close()
    _survived(worker, pid)
