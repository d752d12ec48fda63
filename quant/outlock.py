"""One writer per output: an exclusive lock held for the whole conversion, released by the kernel on exit.

The lock is `fcntl.flock` on `.<out>.lock` next to the output, so a killed run never leaves a stale lock (only,
at worst, an unlocked file that the next run reuses); the holder writes its pid into the file so that a second
run can say which process holds the output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from quant.errors import OutputError

_held: set[str] = set()


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def write_error(e: OSError, path: Path) -> OutputError:
    """A one-line error for a failed write, true to what is left behind (callers remove partial files first)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"disk full while writing {path}; the partial output was removed",
            hint="free some space (or choose another -o) and run the command again",
        )
    return OutputError(
        f"cannot write {e.filename or path} ({e.strerror or e})",
        hint="choose another -o, or make the folder writable",
    )


def _acquire(out: Path, path: Path) -> int:
    """A descriptor holding the lock on the file now at `path` (a file unlinked by a finishing holder between
    our open and our lock is not the lock any more: try again on the new one)."""
    for _ in range(100):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise write_error(e, path) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{out} is being written by another dsv4 quantize (pid {holder})",
                hint="wait for it to finish, or stop it and run this command again",
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except FileNotFoundError:
            pass
        except OSError as e:
            os.close(fd)
            raise write_error(e, path) from e
        os.close(fd)
    raise OutputError(f"{out}: could not lock {path}", hint="run the command again")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the output's lock; raises OutputError at once (naming the other process) when another run holds it.
    The lock file is removed on release, while still locked (`_acquire` copes with that)."""
    path = lock_path(out)
    key = str(path.resolve())
    if key in _held:  # already ours (the CLI locks before its own checks, then converts)
        yield
        return
    fd = _acquire(out, path)
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
