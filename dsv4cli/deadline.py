"""Overall deadlines for talking to peers that may stall (Hub servers, RPC workers).

A socket or HTTP timeout bounds one wait; a peer that drips a byte just before each one expires never trips it.
A `Deadline` bounds the whole exchange (connect, every read, every retry): each wait is given what is left.
The defaults are what a person would wait for at a prompt; each is settable by an environment variable.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from dsv4cli.errors import UsageError

T = TypeVar("T")


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from environment variable `name`, else `default`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{name}={raw!r}: expected a positive number of seconds")
    return value


class Deadline:
    """`seconds` from now; `left()` is what remains, and raises TimeoutError once nothing does."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"deadline of {self.seconds:g} s passed")
        return remaining

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on a helper thread, waited for until the deadline: TimeoutError then, however `fn` is stuck
        (a read that trickles in under every per-read timeout). `fn` should bound its own waits by `left()`, so
        a thread given up on ends soon after; it is a daemon and never holds the process open."""
        outcome: list[tuple[bool, object]] = []

        def target() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as e:
                outcome.append((False, e))

        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        worker.join(max(self.end - time.monotonic(), 0))
        if not outcome:
            raise TimeoutError(f"deadline of {self.seconds:g} s passed")
        ok, value = outcome[0]
        if not ok:
            raise value  # type: ignore[misc]
        return value  # type: ignore[return-value]
