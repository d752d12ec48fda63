"""A preloaded library that gives llama-perplexity's log thread time to print its last lines before the process ends.

Why: llama.cpp prints through a worker thread fed by a queue (common/log.cpp), and its logger is deliberately
never destroyed. The pinned build's `llama_perplexity()` returns from `main` without `common_log_flush` (the
vendored sdist's tools/perplexity/perplexity.cpp; the binary was checked with objdump), so `exit` ends the process
while the queue still holds the final rows and statistics: strace shows the main thread's `exit_group` while the
log thread is mid-write. How much is lost depends only on scheduling (pipe or file, one stream or two, colours,
prefixes and timestamps make no difference). A destructor in an `LD_PRELOAD`ed library runs inside `exit`, before
the other threads are killed; sleeping there lets the log thread drain its queue (under a millisecond of work).

The library is compiled once with the C compiler the engine build needs anyway and kept under the dsv4 home. Where
it cannot be made (no compiler, not Linux), llama-perplexity runs as it is and `perplexity.kld_run`'s retry guards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dsv4cli.home import dsv4_home

DRAIN_MS = 250
SOURCE = f"""#include <time.h>
__attribute__((destructor)) static void dsv4_exit_drain(void) {{
    struct timespec t = {{0, {DRAIN_MS} * 1000 * 1000}};
    nanosleep(&t, 0);
}}
"""


def exit_drain_library() -> Path | None:
    """The compiled library (made on first use), or None where it cannot be made."""
    if not sys.platform.startswith("linux"):
        return None
    lib = dsv4_home() / "eval" / f"exit-drain-{hashlib.sha256(SOURCE.encode()).hexdigest()[:12]}.so"
    if lib.is_file():
        return lib
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "drain.c", Path(tmp) / "drain.so"
        src.write_text(SOURCE)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(out), str(src)], capture_output=True,
                           timeout=60, check=True)  # fmt: skip
            out.replace(lib)
    return lib if lib.is_file() else None


def drained_env() -> dict[str, str]:
    """The environment to run llama-perplexity in: this one, the library added to `LD_PRELOAD` where it exists."""
    env = dict(os.environ)
    lib = exit_drain_library()
    if lib is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, [str(lib), env.get("LD_PRELOAD", "")]))
    return env
