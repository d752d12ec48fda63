"""Run llama-server as a child: port check, launch in its own process group, wait for /health, stop cleanly.

The server gets its own session so a terminal's Ctrl-C reaches only dsv4, which then stops the whole group
(llama-server and anything it spawned); on Linux the kernel also kills it if dsv4 itself dies (PDEATHSIG),
so no server is ever left behind holding the port and the model's memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from dsv4cli.engine.stack import raise_stack_limit
from dsv4cli.errors import Dsv4Error, UsageError
from dsv4cli.toolchain.logs import log_tail

HEALTH_TIMEOUT_S = 600.0  # a large model read from a slow disk takes minutes; a crash is seen at once


class ServerError(Dsv4Error, RuntimeError):
    """llama-server did not start, or the address it should listen on is taken."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: addresses no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Fail before launching when something already listens there (llama-server would only log it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT; a listener still conflicts
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServerError(f"port {port} on {host} is already in use", hint="pick another with --port") from e
            raise UsageError(f"--host {host} --port {port}: cannot bind ({e.strerror})") from e


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and `--port 0`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _child_setup() -> None:
    """In the child before exec: ask Linux to SIGTERM it when dsv4 dies, even by SIGKILL, and give it the stack
    llama.cpp's tokenizer needs for long runs of letters (`dsv4cli.engine.stack`)."""
    raise_stack_limit()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """One llama-server child with its log file; `stop()` ends its whole process group."""

    def __init__(
        self, argv: Sequence[str], *, log: Path, base_url: str, env: dict[str, str] | None = None, append: bool = False
    ) -> None:
        self.log = log
        self.base_url = base_url
        self.argv = list(argv)
        self.env = env
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab" if append else "wb") as f:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup,
                env={**os.environ, **(env or {})},
            )

    def relaunch(self) -> ServerProcess:
        """The same server started again (same command line and environment), logging after the old log."""
        return ServerProcess(self.argv, log=self.log, base_url=self.base_url, env=self.env, append=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 6) -> str:
        return log_tail(self.log, n)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):  # refused while binding, 503 while loading the model
            return False

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT_S) -> None:
        """Block until /health says the model is loaded; on exit or timeout stop it and raise with the log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(
                    f"llama-server exited with code {code} while starting (log: {self.log}): {self.log_tail()}"
                )
            if self._healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise ServerError(f"llama-server was not healthy after {timeout:.0f} s (log: {self.log}): {self.log_tail()}")

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group (llama-server finishes open requests' slots), SIGKILL after `grace` s."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
