"""`dsv4 serve` keeps llama-server up: one request that crashes it must not end the service.

While serve runs, a llama-server that exits is started again with the same command line (same port, key, model
and log file), after a line on stderr and in its log saying how it ended. A server that keeps dying (more than
MAX_RESTARTS times within WINDOW_S) or whose RPC worker is gone ends serve with the log's tail instead: restarting
cannot help those.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from dsv4cli.rpc.health import lost_worker_error
from dsv4cli.server.process import HEALTH_TIMEOUT_S, ServerError

if TYPE_CHECKING:
    from dsv4cli.server.launch import RunningServer

MAX_RESTARTS = 5
WINDOW_S = 600.0


def exit_reason(code: int) -> str:
    """'exited with code 1' or 'was killed by SIGSEGV' (Popen reports a signal as a negative code)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def supervise(
    server: RunningServer, *, note: Callable[[str], None], health_timeout: float = HEALTH_TIMEOUT_S
) -> NoReturn:
    """Wait on llama-server for as long as serve runs, restarting it whenever it dies (see the module docstring).

    Raises:
        RpcError: an RPC worker the server used is gone.
        ServerError: it died more than MAX_RESTARTS times within WINDOW_S.
    """
    deaths: deque[float] = deque()
    while True:
        code = server.process.wait()
        log = server.process.log
        workers = server.model.workers
        if workers and (lost := lost_worker_error(log, workers)):
            raise lost
        now = time.monotonic()
        deaths.append(now)
        while now - deaths[0] > WINDOW_S:
            deaths.popleft()
        how = f"llama-server {exit_reason(code)}"
        if len(deaths) > MAX_RESTARTS:
            raise ServerError(
                f"{how}, the {len(deaths)}th time within {WINDOW_S:.0f} s; not restarting it again "
                f"(log: {log}): {server.process.log_tail()}"
            )
        line = f"{how}; restarting it (restart {len(deaths)} of at most {MAX_RESTARTS} within {WINDOW_S:.0f} s)"
        note(f"{line}; log: {log}")
        with contextlib.suppress(OSError), log.open("a") as f:
            f.write(f"\ndsv4 serve: {line}\n")
        server.process = server.process.relaunch()
        try:
            server.process.wait_healthy(health_timeout)
        except ServerError as e:
            note(str(e))  # it died again while starting: counted on the next turn of the loop
            continue
        note(f"llama-server is serving again at {server.base_url}/v1 (pid {server.process.pid})")
