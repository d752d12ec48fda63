"""`dsv4 worker`'s work: llama.cpp's `ggml-rpc-server` behind the budget relay, on the address the client is given.

With `--mem` the server (from `dsv4 engine build`) listens in a network namespace of its own (`netns.py`), which
only the relay reaches, and the relay (`relay.py`) listens on `--host/--port`, checks every request and enforces
the budget; where no namespace can be made (not root) the server falls back to a free loopback port, and the
caller is told why. Without `--mem` the server listens on `--host/--port` itself and takes what it is sent.
A server that dies (a request the relay could not judge, or any without `--mem`) is restarted, and the caller
told. RPC has no authentication or encryption: anything but loopback needs `allow_remote`, and the caller prints
the warning.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dsv4cli.deadline import Deadline
from dsv4cli.errors import UsageError
from dsv4cli.home import dsv4_home
from dsv4cli.rpc.netns import isolated_argv, isolation_problem, namespace_of
from dsv4cli.rpc.protocol import Cmd, Endpoint, RpcError, hello, request
from dsv4cli.rpc.relay import BudgetRelay, Upstream
from dsv4cli.server.process import ServerProcess, check_port_free, free_port, is_loopback
from dsv4cli.toolchain.build import ServerBinary
from dsv4cli.units import GIB, human_bytes

DEFAULT_PORT = 50052  # ggml-rpc-server's own default
PRIVATE_PORT = 50052  # inside the server's own network namespace nothing else listens
START_TIMEOUT_S = 30.0
MAX_RESTARTS = 5  # within RESTART_WINDOW_S; a server that keeps dying is an error, not a loop
RESTART_WINDOW_S = 60.0
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
    launcher: _Launcher | None = None
    note: Callable[[str], None] = print
    _crashes: list[float] = field(default_factory=list)
    _stopping: bool = False

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
        """Block while the server runs (the relay serves on its own thread); restart it when it dies, saying so,
        unless it died MAX_RESTARTS times within RESTART_WINDOW_S (then that is the error)."""
        while True:
            code = self.process.wait()
            if self._stopping:
                return
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < RESTART_WINDOW_S] + [now]
            died = f"ggml-rpc-server {_exit_text(code)} (log: {self.process.log}): {self.process.log_tail(3)}"
            if self.launcher is None or len(self._crashes) > MAX_RESTARTS:
                raise RpcError(died, hint=f"it died {len(self._crashes)} times within {RESTART_WINDOW_S:g} s")
            self.note(f"{died}; restarting it")
            self.process = self.launcher.start(self.process.log)
            self.note(f"ggml-rpc-server restarted (pid {self.process.pid})")

    def stop(self) -> None:
        self._stopping = True
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


def _exit_text(code: int) -> str:
    if code < 0:
        with_name = {s.value: s.name for s in signal.Signals}
        return f"was killed by {with_name.get(-code, f'signal {-code}')}"
    return f"exited with code {code}"


@dataclass
class _Launcher:
    """Starts ggml-rpc-server (again): on `server` in its own network namespace when `isolated`, and points the
    relay's `upstream` at it."""

    argv: list[str]
    server: Endpoint
    isolated: bool
    upstream: Upstream
    devices: int = 1

    def start(self, log: Path) -> ServerProcess:
        if log.exists():
            log.replace(log.with_suffix(".previous.log"))
        process = ServerProcess(isolated_argv(self.argv) if self.isolated else self.argv, log=log, base_url="")
        try:
            self.upstream.endpoint = self.server
            self.upstream.netns = namespace_of(process.pid) if self.isolated else None
            self.devices = _wait_listening(process, self.upstream)
        except BaseException:
            process.stop(grace=3.0)
            raise
        return process


def start_worker(opts: WorkerOptions, engine: ServerBinary, *, note: Callable[[str], None] = print) -> RunningWorker:
    """Start the server and wait until it answers HELLO. With a budget it listens where only the relay reaches it
    (its own network namespace; a private loopback port where none can be made, with a `note` saying why) and
    the relay takes the public address; without, it listens on the public one itself (nothing in the path)."""
    check_worker_options(opts)
    if opts.port:
        check_port_free(opts.host, opts.port)
    budget = int(opts.mem_gib * GIB) if opts.mem_gib is not None else None
    problem = isolation_problem() if budget is not None else "no budget"
    if budget is None:
        server = Endpoint(opts.host, opts.port or free_port(opts.host))
    elif problem is None:
        server = Endpoint("127.0.0.1", PRIVATE_PORT)
    else:
        server = Endpoint("127.0.0.1", free_port())
        note(
            f"warning: cannot give ggml-rpc-server a private network ({problem}); it listens on {server}, "
            "which other local users can reach past the relay and its budget (run `dsv4 worker` as root to close it)"
        )
    argv = [str(engine.tool("ggml-rpc-server")), "--host", server.host, "--port", str(server.port)]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    log = dsv4_home() / "logs" / f"rpc-server-{opts.port or server.port}.log"
    reach = Endpoint("127.0.0.1", server.port) if server.host in ("0.0.0.0", "::") else server
    launcher = _Launcher(argv, reach, isolated=problem is None, upstream=Upstream(reach))
    process = launcher.start(log)
    relay = None
    try:
        if budget is not None:
            relay = BudgetRelay(Endpoint(opts.host, opts.port), launcher.upstream, budget, devices=launcher.devices,
                                note=note)  # fmt: skip
            threading.Thread(target=relay.serve_forever, daemon=True).start()
    except BaseException:
        process.stop(grace=3.0)
        raise
    address = f"{_reachable_host(opts.host)}:{relay.port if relay else server.port}"
    devices = read_devices(log)
    free = sum(int(d["free_bytes"]) for d in devices)
    if budget is not None and devices and budget > free:
        note(f"warning: --mem {opts.mem_gib:g} GiB is more than the {human_bytes(free)} its devices have free; clients "
             "are told at most what is free")  # fmt: skip
    return RunningWorker(process, relay, address, budget, devices, launcher, note)


def _wait_listening(process: ServerProcess, upstream: Upstream) -> int:
    """Wait until the server answers HELLO; its device count."""
    deadline = Deadline(START_TIMEOUT_S)
    while not deadline.expired:
        code = process.proc.poll()
        if code is not None:
            raise RpcError(f"ggml-rpc-server {_exit_text(code)} (log: {process.log}): {process.log_tail()}")
        try:
            with upstream.connect(timeout=2.0) as sock:
                hello(sock, upstream.endpoint, Deadline(2.0))
                (count,) = struct.unpack("<I", request(sock, Cmd.DEVICE_COUNT, b"", Deadline(2.0)) or b"")
                return count
        except (OSError, TimeoutError, struct.error):
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
