"""What the `dsv4 worker --mem` relay adds to one decoded token, without llama-server's own noise.

A client sends what llama.cpp sends one loopback worker per decoded token of the tiny model (`--sets` SET_TENSOR
requests of `--set-bytes` each, one per send, as ggml-rpc's client does, then a GET_TENSOR of `--get-bytes` whose
answer it waits for) to a plain worker and to a budgeted one (the relay in front of the same server), in
alternating blocks, and reports per-token time (median and 10th percentile) for each, the difference, and the CPU
the relay spent per token. The client is a process of its own, so the relay (a thread of this one, as in `dsv4
worker`) does not share Python's lock with it. `bench/rpc.py` measures
whole decodes; this isolates the relay, which a shared machine's noise hides there.

Usage: .venv/bin/python bench/relay.py [--tokens 3000] [--block 50] [--sets 18] [--set-bytes 2900]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import subprocess
import sys
import time

PTR_BUFFER = 1 << 20


def tensor(buffer: int, data: int, n: int) -> bytes:
    """An f32 vector of n elements at `data` in `buffer` (rpc_tensor)."""
    from dsv4cli.rpc.protocol import TENSOR

    return TENSOR.pack(1, 0, buffer, n, 1, 1, 1, 4, 4 * n, 4 * n, 4 * n, 0, *[0] * 16, 0, *[0] * 10, 0, 0, data,
                       b"bench", 0)  # fmt: skip


class Client:
    """One connection, with a buffer, and one decoded token's requests ready to send."""

    def __init__(self, address: str, sets: int, set_bytes: int, get_bytes: int) -> None:
        from dsv4cli.rpc.protocol import ALLOC_REPLY, ALLOC_REQUEST, U64, Cmd, hello, parse_endpoints, request

        where = parse_endpoints(address)[0]
        self.sock = socket.create_connection((where.host, where.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello(self.sock, where)
        ptr, _ = ALLOC_REPLY.unpack(request(self.sock, Cmd.ALLOC_BUFFER, ALLOC_REQUEST.pack(0, PTR_BUFFER)))
        (base,) = U64.unpack(request(self.sock, Cmd.BUFFER_GET_BASE, U64.pack(ptr)))
        n = max(set_bytes, get_bytes) // 4
        body = tensor(ptr, base, n) + b"\0" + U64.pack(0) + bytes(4 * n)[:set_bytes]
        self.sets = [bytes([Cmd.SET_TENSOR]) + U64.pack(len(body)) + body] * sets
        get = tensor(ptr, base, n) + struct.pack("<QQ", 0, get_bytes)
        self.get = bytes([Cmd.GET_TENSOR]) + U64.pack(len(get)) + get
        self.get_bytes = get_bytes

    def token(self) -> float:
        start = time.perf_counter()
        for message in self.sets:
            self.sock.sendall(message)
        self.sock.sendall(self.get)
        want, got = 8 + self.get_bytes, 0
        while got < want:
            chunk = self.sock.recv(want - got)
            if not chunk:
                raise ConnectionError("worker closed")
            got += len(chunk)
        return time.perf_counter() - start


def measure(addresses: dict[str, str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Per-token seconds for each worker, in alternating blocks (after one block each of warm-up)."""
    clients = {name: Client(a, args.sets, args.set_bytes, args.get_bytes) for name, a in addresses.items()}
    times: dict[str, list[float]] = {name: [] for name in clients}
    for client in clients.values():
        for _ in range(args.block):
            client.token()
    for _ in range(max(args.tokens // args.block, 1)):
        for name, client in clients.items():
            times[name].extend(client.token() for _ in range(args.block))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--sets", type=int, default=18)
    parser.add_argument("--set-bytes", type=int, default=2900)
    parser.add_argument("--get-bytes", type=int, default=312)
    parser.add_argument("--client", help=argparse.SUPPRESS)  # JSON of addresses: be the client process
    args = parser.parse_args()
    if args.client:
        print(json.dumps(measure(json.loads(args.client), args)))
        return

    from dsv4cli.rpc.worker import WorkerOptions, start_worker
    from dsv4cli.toolchain.build import find_engine

    engine = find_engine()
    workers = {
        "direct": start_worker(WorkerOptions(port=0, threads=1), engine),
        "relayed": start_worker(WorkerOptions(port=0, threads=1, mem_gib=1.0), engine),
    }
    try:
        addresses = json.dumps({name: w.address for name, w in workers.items()})
        before = time.process_time()  # this process runs the relay (its threads) and nothing else meanwhile
        client = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--client", addresses],
                                capture_output=True, text=True, check=True)  # fmt: skip
        relay_cpu = time.process_time() - before
    finally:
        for w in workers.values():
            w.stop()
    times = json.loads(client.stdout)

    def line(name: str) -> str:
        ts = sorted(times[name])
        return f"{statistics.median(ts) * 1e6:8.1f} us median, {ts[len(ts) // 10] * 1e6:8.1f} us p10"

    print(f"one worker's token ({args.sets} SET_TENSOR of {args.set_bytes} B + GET_TENSOR of {args.get_bytes} B):")
    for name in times:
        print(f"  {name:8s}{line(name)}")
    added = statistics.median(times["relayed"]) - statistics.median(times["direct"])
    n = len(times["relayed"]) + args.block
    print(f"  the relay adds {added * 1e6:.1f} us per token (median); its CPU: {relay_cpu / n * 1e6:.1f} us per token")


if __name__ == "__main__":
    main()
