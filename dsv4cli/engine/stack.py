"""The stack llama.cpp's tokenizer needs, so that no input text can crash the process running it.

llama.cpp splits text with std::regex before BPE, and std::regex recurses once per character of a match: a run of
30,000 letters without a space (or of spaces, dots, CJK) needs about 10 MB of stack, more than the 8 MB a Linux
thread gets, and the process dies with SIGSEGV. Measured with llama-cpp-python 0.3.36 on the tiny model: at most
~500 bytes of stack per character of the longest run (1,000,000 letters fit in 320 MB, not in 256 MB). A match
never spans a change between whitespace and non-whitespace (beyond one leading space), so the longest such run
bounds the depth. In-process tokenization runs on a thread with TOKENIZER_STACK_BYTES of stack (only what is
touched is ever committed) and text with a run longer than MAX_RUN_CHARS is refused with one line;
`dsv4 serve` starts llama-server with SERVER_STACK_BYTES as its stack limit, which glibc also gives each thread.
"""

from __future__ import annotations

import re
import resource
import threading
from collections.abc import Callable
from typing import TypeVar

from dsv4cli.errors import UsageError

TOKENIZER_STACK_BYTES = 1 << 30
MAX_RUN_CHARS = 1_000_000  # about half of TOKENIZER_STACK_BYTES at the measured worst ~500 bytes per character
SERVER_STACK_BYTES = 512 << 20  # a run of ~1M characters; a longer one kills llama-server, which serve restarts
_RUN_RE = re.compile(r"\s+|\S+")

T = TypeVar("T")


def check_runs(text: str, what: str = "the prompt") -> None:
    """Refuse text whose longest run without a whitespace change is deeper than the tokenizer's stack allows."""
    if len(text) > MAX_RUN_CHARS and max(len(run) for run in _RUN_RE.findall(text)) > MAX_RUN_CHARS:
        raise UsageError(
            f"{what} has a run of more than {MAX_RUN_CHARS:,} characters without a space (or of spaces only); "
            "llama.cpp's tokenizer cannot take it",
            hint="break the text up with spaces or newlines",
        )


def on_big_stack(fn: Callable[[], T]) -> T:
    """`fn()` run on a thread with TOKENIZER_STACK_BYTES of stack; its result or its exception comes back."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    previous = threading.stack_size(TOKENIZER_STACK_BYTES)
    try:
        worker = threading.Thread(target=run, name="dsv4-tokenize", daemon=True)
        worker.start()
    except RuntimeError as e:  # the address space is capped (`ulimit -v`) below what the stack reserves
        raise UsageError(
            f"cannot start the tokenizer's thread with its {TOKENIZER_STACK_BYTES >> 20} MiB stack ({e})",
            hint="raise the address-space limit (ulimit -v)",
        ) from e
    finally:
        threading.stack_size(previous)
    worker.join()
    if error:
        raise error[0]
    return result[0]


def raise_stack_limit() -> None:
    """In llama-server's child process before exec: a stack limit of SERVER_STACK_BYTES (within the hard limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = SERVER_STACK_BYTES if hard == resource.RLIM_INFINITY else min(SERVER_STACK_BYTES, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
