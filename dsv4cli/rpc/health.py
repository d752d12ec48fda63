"""Workers seen from the serving side: all reachable before llama-server starts, and which one was lost after.

llama.cpp aborts the whole llama-server when a worker's connection breaks ("Remote RPC server crashed or returned
malformed response", ggml-rpc.cpp): the open request ends at once, and dsv4 turns the abort into one line that
names the worker that no longer answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dsv4cli.rpc.protocol import Endpoint, RpcError, parse_endpoints, probe

ABORT_MARKER = "Remote RPC server crashed"


def rpc_endpoints(argv: Sequence[str]) -> str | None:
    """The `--rpc` value of a llama.cpp command line."""
    args = list(argv)
    return args[args.index("--rpc") + 1] if "--rpc" in args[:-1] else None


def _workers(rpc: str | Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """The workers, given as endpoints or as llama.cpp's `--rpc` value."""
    return parse_endpoints(rpc) if isinstance(rpc, str) else tuple(rpc)


def check_workers(rpc: str | Sequence[Endpoint]) -> None:
    """Every worker answers HELLO with a compatible version within DSV4_RPC_TIMEOUT; the first that does not is
    named in the error. `rpc` is the workers, or llama.cpp's `--rpc` value."""
    for endpoint in _workers(rpc):
        probe(endpoint, transfer=0, pings=1)


def lost_worker_error(log: Path, rpc: str | Sequence[Endpoint]) -> RpcError | None:
    """After llama-server exited: the error naming the lost worker(s), when an RPC failure is what killed it.
    `rpc` is the workers, or llama.cpp's `--rpc` value."""
    try:
        if ABORT_MARKER not in log.read_text(errors="replace"):
            return None
    except OSError:
        return None
    workers = _workers(rpc)
    lost = []
    for endpoint in workers:
        try:
            probe(endpoint, timeout=1.0, transfer=0, pings=1)
        except RpcError:
            lost.append(str(endpoint))
    who = f"RPC worker {', '.join(lost)}" if lost else f"an RPC worker ({', '.join(map(str, workers))})"
    return RpcError(
        f"{who} stopped answering; llama-server aborted the request (log: {log})",
        hint="restart `dsv4 worker` there and `dsv4 serve` here",
    )
