"""The relay's buffered socket I/O (`dsv4cli.rpc.buffered`): messages come out whole and in order however the bytes
arrive, a deadline holds across many small arrivals, and collected writes reach the peer before any wait."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from dsv4cli.deadline import Deadline
from dsv4cli.rpc.buffered import READ_AHEAD, SEND_AT, Inbox, Outbox


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _send_in_pieces(sock: socket.socket, data: bytes, rng: random.Random, pause: float = 0.0) -> None:
    at = 0
    while at < len(data):
        n = rng.choice((1, 7, 300, 5000, 70000))
        sock.sendall(data[at : at + n])
        at += n
        if pause:
            time.sleep(pause)


def test_messages_come_out_whole_and_in_order_however_they_arrive(pair) -> None:
    rng = random.Random(7)
    sizes = [rng.choice((0, 1, 9, 305, 3000, READ_AHEAD - 1, READ_AHEAD + 1, 3 * READ_AHEAD)) for _ in range(200)]
    messages = [rng.randbytes(n) for n in sizes]
    writer = threading.Thread(target=_send_in_pieces, args=(pair[0], b"".join(messages), rng))
    writer.start()
    inbox = Inbox(pair[1])
    assert [inbox.take(n, 5.0) for n in sizes] == messages
    writer.join()
    assert inbox.buffered() == 0


def test_a_deadline_holds_against_bytes_that_drip(pair) -> None:
    stop = threading.Event()

    def drip() -> None:
        while not stop.is_set():
            pair[0].sendall(b"x")
            time.sleep(0.05)

    threading.Thread(target=drip, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        Inbox(pair[1]).take(1000, Deadline(0.5))
    stop.set()
    assert time.monotonic() - start < 1.0


def test_wait_times_out_without_a_byte_and_a_closed_peer_is_an_error(pair) -> None:
    inbox = Inbox(pair[1])
    with pytest.raises(TimeoutError):
        inbox.wait(0.2)
    pair[0].sendall(b"ab")
    pair[0].close()
    inbox.wait(0.2)
    assert inbox.take(2) == b"ab"
    with pytest.raises(ConnectionError):
        inbox.take(1, 1.0)


def test_collected_writes_go_out_before_the_inbox_waits(pair) -> None:
    """The relay's contract: what it forwarded reaches the server before it waits for anything."""
    out = Outbox(pair[0])
    out.write(b"req", b"uest")
    assert _available(pair[1]) == b""  # collected, not sent
    inbox = Inbox(pair[0], before_wait=out.flush)
    pair[1].sendall(b"!")
    inbox.take(1, 1.0)  # waits for the peer: flushes first
    assert _available(pair[1]) == b"request"


def test_large_writes_go_out_at_once_in_order(pair) -> None:
    out = Outbox(pair[0])
    big = bytes(range(256)) * (SEND_AT // 128)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(Inbox(pair[1]).take(2 + len(big), 5.0)))
    reader.start()
    out.write(b"a", big, b"b")  # `big` leaves at once, after "a"; "b" waits for flush
    out.flush()
    reader.join()
    assert bytes(received) == b"a" + big + b"b"


def _available(sock: socket.socket) -> bytes:
    sock.settimeout(0.1)
    try:
        return sock.recv(1 << 16)
    except TimeoutError:
        return b""
