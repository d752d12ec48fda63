"""Running the engine build's `llama-perplexity` and reading its figures.

Two runs per evaluation: `--kl-divergence-base FILE` saves the reference's log-probabilities (with its perplexity),
then `--kl-divergence` runs the model against that file and prints the per-chunk table and the final statistics
(tools/perplexity/perplexity.cpp). Both runs get the plan's placement (`engine.scoring.scoring_argv`), with `-c` the
evaluation context.

llama.cpp prints through a worker thread (common/log.cpp), and the pinned build's llama-perplexity returns from
`main` without flushing it: the process can exit with status 0 while the last rows and the final statistics are
still queued (22 of 30 runs, six at once on 2 busy cores). `exit_drain` preloads a library that lets the thread
drain inside `exit` (0 of 48 with it). A run's output is still accepted only when every chunk's row is there
exactly once and the statistics block is complete, and `kld_run` runs it again otherwise (`IncompleteOutput`), as
a guard where the library cannot be made. The reference logits need no output at all: they are a file, checked
by size. Nothing here changes the engine build.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.engine.scoring import TOOL
from dsv4cli.errors import Dsv4Error
from dsv4cli.eval.exit_drain import drained_env

ATTEMPTS = 5  # runs of the model before an incomplete output is an error
_NUM = r"(-?[\d.]+|-?nan|-?inf)"
_BASE_CHUNK = re.compile(r"\[(\d+)\]" + _NUM + ",")
_PAIR = _NUM + r" ± +" + _NUM  # a figure and its ±
# One per-chunk row of the KLD table: chunk, PPL(Q), ln ratio, KLD, then Δp and same-top-p in percent.
_KLD_ROW = re.compile(r"^\s*(\d+)\s+" + r"\s+".join([_PAIR] * 3 + [_PAIR + " %"] * 2) + r"\s*$", re.M)
_STATS = {
    "ppl": r"Mean PPL\(Q\)\s*: +" + _PAIR,
    "ppl_ref": r"Mean PPL\(base\)\s*: +" + _PAIR,
    "kld_mean": r"Mean +KLD: +" + _PAIR,
    "kld_max": r"Maximum KLD: +" + _NUM,
    "kld_p999": r"99\.9% +KLD: +" + _NUM,
    "kld_p99": r"99\.0% +KLD: +" + _NUM,
    "kld_median": r"Median +KLD: +" + _NUM,
    "rms_dp": r"RMS Δp +: +" + _PAIR + " %",
    "top1": r"Same top p: +" + _PAIR + " %",
}


class PerplexityError(Dsv4Error, RuntimeError):
    """llama-perplexity failed or printed no figures."""


class IncompleteOutput(PerplexityError):
    """llama-perplexity exited normally but its output was cut short (see the module docstring)."""


@dataclass(frozen=True)
class KldResult:
    """The figures of one `--kl-divergence` run. Fractions, not percent: `top1` and `rms_dp`."""

    ppl: float
    ppl_err: float
    ppl_ref: float
    ppl_ref_err: float
    kld_mean: float
    kld_mean_err: float
    kld_median: float
    kld_p99: float  # 99.0 % of tokens have a smaller KLD
    kld_p999: float  # 99.9 %
    kld_max: float
    top1: float
    rms_dp: float
    chunks: int


def run_tool(argv: Sequence[str], log: Path, on_chunk: Callable[[int], None]) -> str:
    """Run llama-perplexity, its stdout and stderr into `log` (after the command line) as they come; `on_chunk(n)`
    hears each chunk done.

    Ctrl-C (or any exception) stops the child's process group before it propagates. Returns the whole output.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    text = bytearray()
    seen = 0
    with log.open("wb") as sink:
        sink.write(f"$ {shlex.join(argv)}\n".encode())
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, env=drained_env(),
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            while block := os.read(proc.stdout.fileno(), 65536):
                sink.write(block)
                text += block
                done = _chunks_done(text[-8192:].decode("utf-8", "replace"))  # the counts are cumulative
                if done > seen:
                    seen = done
                    on_chunk(done)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                _stop(proc)
    output = text.decode("utf-8", "replace")
    if code != 0:
        raise PerplexityError(f"{TOOL} exited with code {code} (log: {log}): {_tail(output)}")
    return output


def _chunks_done(output: str) -> int:
    rows = [int(m.group(1)) for m in _KLD_ROW.finditer(output)] + [
        int(m.group(1)) for m in _BASE_CHUNK.finditer(output)
    ]
    return max(rows, default=0)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
            return


def _tail(output: str, n: int = 3) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("#")]
    return " | ".join(lines[-n:]) or "it printed nothing"


def parse_kld(output: str, log: Path, chunks: int) -> KldResult:
    """The figures of a complete `--kl-divergence` run over `chunks` chunks; IncompleteOutput when its output was
    cut short (a row missing or repeated, or the statistics block incomplete)."""
    rows = [int(m.group(1)) for m in _KLD_ROW.finditer(output)]
    stats = {key: re.search(pattern, output) for key, pattern in _STATS.items()}
    missing = [key for key, found in stats.items() if found is None]
    if rows != list(range(1, chunks + 1)) or missing:
        raise IncompleteOutput(
            f"{TOOL}'s output was cut short ({len(rows)} of {chunks} chunk rows, statistics "
            f"{'incomplete' if missing else 'complete'}; log: {log}): {_tail(output)}"
        )

    def value(key: str, group: int = 1) -> float:
        return float(stats[key].group(group))  # type: ignore[union-attr]

    return KldResult(
        ppl=value("ppl"), ppl_err=value("ppl", 2), ppl_ref=value("ppl_ref"), ppl_ref_err=value("ppl_ref", 2),
        kld_mean=value("kld_mean"), kld_mean_err=value("kld_mean", 2), kld_median=value("kld_median"),
        kld_p99=value("kld_p99"), kld_p999=value("kld_p999"), kld_max=value("kld_max"),
        top1=value("top1") / 100, rms_dp=value("rms_dp") / 100, chunks=chunks,
    )  # fmt: skip


def kld_run(
    argv: Sequence[str], log: Path, chunks: int, on_chunk: Callable[[int], None], note: Callable[[str], None]
) -> KldResult:
    """Run the model against the reference logits until its output is complete (at most ATTEMPTS runs)."""
    for attempt in range(1, ATTEMPTS + 1):
        output = run_tool(argv, log, on_chunk)
        try:
            return parse_kld(output, log, chunks)
        except IncompleteOutput as e:
            if attempt == ATTEMPTS:
                raise
            note(f"{e}; running it again ({attempt + 1} of {ATTEMPTS})")
    raise AssertionError("unreachable")
