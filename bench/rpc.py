"""Benchmark serving across llama.cpp RPC workers (`dsv4 worker`) against one process, on this machine.

1. Decode tok/s of llama-server with the model's layers on two loopback workers vs the same flags without them,
   alternating runs in one script (loopback has no wire cost, so the gap is the RPC path itself: serialization,
   one round trip per worker per token), with workers started plainly and with `--mem` (the budget relay in the
   path).
2. Bytes that cross the client-worker boundary per decoded token, counted by a TCP proxy between llama-server and
   each worker, against the plan's prediction (`estimates.decode_bytes_per_token.network`). Decode bytes are the
   difference between two answers of different lengths, so the prompt and set-up traffic cancel.

Usage: .venv/bin/python bench/rpc.py [--gguf PATH] [--tokens 200] [--repeats 3] [--ctx 4096]
(default GGUF: the built-in tiny model, prepared on first use like `dsv4 chat`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import tempfile
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

PROMPT = "Go on"


class CountingProxy:
    """A TCP forwarder on a free loopback port that counts the bytes each way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent = self.received = 0  # client -> worker, worker -> client
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def total(self) -> int:
        with self._lock:
            return self.sent + self.received

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            upstream = socket.create_connection(self.target)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, upstream, "sent"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "received"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        try:
            while chunk := src.recv(1 << 20):
                dst.sendall(chunk)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(chunk))
        except OSError:
            pass
        finally:
            for s in (src, dst):  # shutdown wakes the other pump's recv; close alone would leave it blocked
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def complete(base_url: str, tokens: int) -> dict:
    body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": True}
    req = urllib.request.Request(f"{base_url}/completion", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def serve(engine, gguf: Path, plan, folder: Path, name: str, rpc: tuple[str, ...]):
    """llama-server with the plan's flags on the given workers, or with none (one process, same flags)."""
    from dsv4cli.load.placement import Placement
    from dsv4cli.models.ref import resolve_model
    from dsv4cli.server.launch import ServeOptions, start_server

    data = plan.to_dict()
    params = plan.load_params()
    local = replace(params, rpc=(), tensor_split=(), n_gpu_layers=0)
    data["llama"] = (replace(params, rpc=rpc) if rpc else local).to_dict()
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    opts = ServeOptions(port=0, mtp=False, parallel=1, health_timeout=120)
    return start_server(resolve_model(str(gguf)), Placement(plan_file=path), opts, engine, note=lambda _: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=4096)
    args = parser.parse_args()

    from dsv4cli.load.resolve import resolve_gguf
    from dsv4cli.models.ref import resolve_model
    from dsv4cli.plan import PlanInputs, make_plan
    from dsv4cli.plan.source import read_gguf
    from dsv4cli.rpc.protocol import Endpoint
    from dsv4cli.rpc.worker import WorkerOptions, start_worker
    from dsv4cli.toolchain.build import find_engine

    engine = find_engine()
    gguf = args.gguf or resolve_gguf(resolve_model("tiny"), note=print)
    # a worker serves one client at a time: a pair per server; the relayed pair has a budget (and so the relay)
    pairs = {
        "direct": [start_worker(WorkerOptions(port=0, threads=1), engine) for _ in range(2)],
        "relayed": [start_worker(WorkerOptions(port=0, threads=1, mem_gib=8.0), engine) for _ in range(2)],
        "counted": [start_worker(WorkerOptions(port=0, threads=1), engine) for _ in range(2)],
    }
    proxies = [CountingProxy(("127.0.0.1", int(w.address.rpartition(":")[2]))) for w in pairs["counted"]]
    endpoints = {name: tuple(w.address for w in ws) for name, ws in pairs.items()}
    endpoints["counted"] = tuple(f"127.0.0.1:{p.port}" for p in proxies)
    servers = {}
    try:
        rpc = tuple(Endpoint("127.0.0.1", p.port) for p in proxies)
        # one thread everywhere: each worker runs one, and on a shared 2-core machine more only spin at barriers
        plan = make_plan(read_gguf(gguf), PlanInputs(ctx=args.ctx, vram_gib=(), margin_gib=0.0, rpc=rpc, threads=1))
        print(f"plan: {plan.verdict}")
        print(f"llama-server {' '.join(plan.llama_args())}")
        with tempfile.TemporaryDirectory() as tmp:
            for name, rpc_args in (("local", ()), *endpoints.items()):
                servers[name] = serve(engine, gguf, plan, Path(tmp), name, rpc_args)
            for server in servers.values():
                complete(server.base_url, 8)  # warm-up: prompt cached, buffers allocated
            tps: dict[str, list[float]] = {name: [] for name in ("local", "direct", "relayed")}
            for _ in range(args.repeats):
                for name in tps:
                    tps[name].append(complete(servers[name].base_url, args.tokens)["timings"]["predicted_per_second"])
            counts = []
            for n in (16, 16 + args.tokens):
                before = sum(p.total() for p in proxies)
                complete(servers["counted"].base_url, n)
                counts.append(sum(p.total() for p in proxies) - before)
    finally:
        for server in servers.values():
            server.process.stop()
        for worker in (w for ws in pairs.values() for w in ws):
            worker.stop()

    local = statistics.median(tps["local"])
    print(f"decode tok/s, one process: {local:.1f}")
    for name in ("direct", "relayed"):
        rate = statistics.median(tps[name])
        print(f"decode tok/s, two loopback workers ({name}): {rate:.1f} ({rate / local:.2f}x)")
    measured = (counts[1] - counts[0]) / args.tokens
    predicted = plan.estimates["decode_bytes_per_token"]["network"]
    ratio = measured / predicted
    print(f"network bytes per decoded token: measured {measured:,.0f}, plan {predicted:,} ({ratio:.2f}x)")
    print(f"plan's network time per token at the measured loopback rates: "
          f"{plan.estimates['decode_seconds_per_token']['network'] * 1e3:.3f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
