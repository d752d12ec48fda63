"""`dsv4 worker`'s work: llama.cpp's `ggml-rpc-server` behind the budget relay, on the address the client is given.

With `--mem` the server (from `dsv4 engine build`) listens on a free loopback port only this machine can reach
and the relay (`relay.py`) listens on `--host/--port` and enforces the budget; without, the server listens there
itself. RPC has no authentication or encryption: anything
but loopback needs `allow_remote`, and the caller prints the warning.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsv4cli.errors import UsageError
from dsv4cli.home import dsv4_home
from dsv4cli.rpc.protocol import Endpoint, RpcError, probe
from dsv4cli.rpc.relay import BudgetRelay
from dsv4cli.server.process import ServerProcess, check_port_free, free_port, is_loopback
from dsv4cli.toolchain.build import ServerBinary
from dsv4cli.units import GIB

DEFAULT_PORT = 50052  # ggml-rpc-server's own default
START_TIMEOUT_S = 30.0
# rpc-server prints its devices as "  NAME: DESCRIPTION (TOTAL MiB, FREE MiB free)" (tools/rpc/rpc-server.cpp)
_DEVICE_LINE = re.compile(r"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)$")
REMOTE_WARNING = (
    "llama.cpp's RPC protocol has no authentication and no encryption: anyone who can reach {address} can run "
    "graphs on this machine and read their data. Use it on a trusted LAN or through an SSH tunnel only."
)


@dataclass(frozen=True)
class WorkerOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port
    mem_gib: float | None = None  # None: what the device reports
    threads: int | None = None
    allow_remote: bool = False


@dataclass
class RunningWorker:
    process: ServerProcess
    relay: BudgetRelay | None  # None without --mem: clients talk to the server itself
    address: str
    budget: int | None
    devices: list[dict[str, object]] = field(default_factory=list)

    def info(self) -> dict[str, object]:
        return {
            "address": self.address,
            "rpc_arg": f"--rpc {self.address}",
            "budget_bytes": self.budget,
            "devices": self.devices,
            "pid": self.process.pid,
            "log": str(self.process.log),
        }

    @property
    def remote(self) -> bool:
        """Other machines can reach it: the warning about RPC's missing authentication applies."""
        return not is_loopback(self.address.rpartition(":")[0].strip("[]"))

    def serve_forever(self) -> None:
        """Block while the server runs (the relay serves on its own thread); its exit is an error."""
        code = self.process.wait()
        raise RpcError(f"ggml-rpc-server exited with code {code} (log: {self.process.log}): {self.process.log_tail()}")

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.close()
        self.process.stop(grace=3.0)


def check_worker_options(opts: WorkerOptions) -> None:
    if opts.mem_gib is not None and opts.mem_gib <= 0:
        raise UsageError(f"--mem must be positive GiB, got {opts.mem_gib:g}")
    if not is_loopback(opts.host) and not opts.allow_remote:
        raise UsageError(
            f"--host {opts.host} would expose an unauthenticated, unencrypted RPC server to the network",
            hint="add --allow-remote on a trusted LAN, or keep 127.0.0.1 and reach it through an SSH tunnel",
        )


def start_worker(opts: WorkerOptions, engine: ServerBinary) -> RunningWorker:
    """Start the server and wait until it answers HELLO. With a budget it listens on a private loopback port and
    the relay takes the public one; without, it listens on the public one itself (nothing in the path)."""
    check_worker_options(opts)
    if opts.port:
        check_port_free(opts.host, opts.port)
    budget = int(opts.mem_gib * GIB) if opts.mem_gib is not None else None
    if budget is None:
        server = Endpoint(opts.host, opts.port or free_port(opts.host))
    else:
        server = Endpoint("127.0.0.1", free_port())
    argv = [str(engine.tool("ggml-rpc-server")), "--host", server.host, "--port", str(server.port)]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    log = dsv4_home() / "logs" / f"rpc-server-{opts.port or server.port}.log"
    process = ServerProcess(argv, log=log, base_url="")
    relay = None
    try:
        _wait_listening(process, Endpoint("127.0.0.1", server.port) if server.host in ("0.0.0.0", "::") else server)
        if budget is not None:
            relay = BudgetRelay(Endpoint(opts.host, opts.port), server, budget)
            threading.Thread(target=relay.serve_forever, daemon=True).start()
    except BaseException:
        process.stop(grace=3.0)
        raise
    address = f"{_reachable_host(opts.host)}:{relay.port if relay else server.port}"
    return RunningWorker(process, relay, address, budget, devices=read_devices(log))


def _wait_listening(process: ServerProcess, private: Endpoint) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        code = process.proc.poll()
        if code is not None:
            raise RpcError(f"ggml-rpc-server exited with code {code} (log: {process.log}): {process.log_tail()}")
        try:
            probe(private, timeout=2.0, transfer=0, pings=1)
            return
        except RpcError:
            time.sleep(0.05)
    raise RpcError(f"ggml-rpc-server did not answer within {START_TIMEOUT_S:g} s (log: {process.log})")


def read_devices(log: Path) -> list[dict[str, object]]:
    """The devices the server announced (name, description, MiB), from its start-up lines."""
    devices = []
    for line in log.read_text(errors="replace").splitlines():
        if m := _DEVICE_LINE.match(line):
            name, description, total, free = m.groups()
            mib = {"total_bytes": int(total) << 20, "free_bytes": int(free) << 20}
            devices.append({"name": name, "description": description, **mib})
    return devices


def _reachable_host(host: str) -> str:
    """The address to hand the client: the bound one, or this machine's name when bound to all interfaces."""
    if host in ("0.0.0.0", "::"):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host
