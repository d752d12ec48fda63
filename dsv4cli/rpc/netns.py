"""A private network for ggml-rpc-server: its own Linux network namespace, whose loopback only the relay reaches.

ggml-rpc-server listens on TCP only and takes any client; on this machine's loopback every local process could
talk to it past the relay and its budget. Started through `BOOT` (unshare(CLONE_NEWNET), bring up `lo`, exec) it
listens in a namespace of its own; the relay connects from a short-lived thread that enters that namespace
(setns) for the connect only. Needs CAP_SYS_ADMIN (root); `isolation_problem` says why not where it is missing.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import threading

CLONE_NEWNET = 0x40000000
# Run as `python -c BOOT BINARY ARGS...`: a new network namespace with loopback up, then exec BINARY in it.
BOOT = r"""
import ctypes, fcntl, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0:
    sys.stderr.write("unshare(CLONE_NEWNET): " + os.strerror(ctypes.get_errno()) + "\n")
    sys.exit(97)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    ifr = struct.pack("16sh14x", b"lo", 0)
    flags = struct.unpack("16sh14x", fcntl.ioctl(s, 0x8913, ifr))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sh14x", b"lo", flags | 1))
if len(sys.argv) > 1:
    os.execv(sys.argv[1], sys.argv[1:])
"""


def isolation_problem() -> str | None:
    """None when a private network namespace can be made here, else why not (one line)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    try:
        done = subprocess.run([sys.executable, "-c", BOOT], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def isolated_argv(argv: list[str]) -> list[str]:
    return [sys.executable, "-c", BOOT, *argv]


def namespace_of(pid: int) -> str:
    return f"/proc/{pid}/ns/net"


def connect_in(netns: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection made inside the network namespace `netns` (the socket stays there once made)."""
    outcome: list[socket.socket | OSError] = []

    def target() -> None:  # a thread of its own: setns changes the calling thread's namespace only
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            there = os.open(netns, os.O_RDONLY)
            try:
                if libc.setns(there, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
                try:
                    outcome.append(socket.create_connection(address, timeout=timeout))
                finally:
                    libc.setns(own, CLONE_NEWNET)
            finally:
                os.close(there)
        except OSError as e:
            outcome.append(e)
        finally:
            os.close(own)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join()
    if isinstance(outcome[0], OSError):
        raise outcome[0]
    return outcome[0]
