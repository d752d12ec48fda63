"""Running the engine build's `llama-perplexity` and reading its figures.

Two runs per evaluation: `--kl-divergence-base FILE` saves the reference's log-probabilities (with its perplexity),
then `--kl-divergence` runs the model against that file and prints the per-chunk table and the final statistics
(tools/perplexity/perplexity.cpp). Both runs get the plan's placement (`LoadParams.cli_args`), with `-c` the
evaluation context.

llama.cpp logs through a worker thread (common/log.cpp) and returns from its error paths without flushing it, so
an early failure can exit with nothing said; the output is read as it comes and kept in a log file, and a run
whose figures are missing is an error naming that log. The final statistics block is flushed at the end of a
successful run; if it is missing anyway, the last per-chunk row still carries PPL, mean KLD, RMS Δp and top-1.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dsv4cli.errors import Dsv4Error

TOOL = "llama-perplexity"
_NUM = r"(-?[\d.]+|-?nan|-?inf)"
_BASE_CHUNK = re.compile(r"\[(\d+)\]" + _NUM + ",")
_KLD_ROW = re.compile(
    r"^\s*(\d+)\s+"
    + _NUM
    + r" ± +"
    + _NUM
    + r"\s+"
    + _NUM
    + r" ± +"
    + _NUM
    + r"\s+"
    + _NUM
    + r" ± +"
    + _NUM
    + r"\s+"
    + _NUM
    + r" ± +"
    + _NUM
    + r" %\s+"
    + _NUM
    + r" ± +"
    + _NUM
    + r" %\s*$",
    re.M,
)
_FINAL_BASE = re.compile(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM)
_STATS = {
    "ppl": r"Mean PPL\(Q\)\s*: +" + _NUM + r" ± +" + _NUM,
    "ppl_ref": r"Mean PPL\(base\)\s*: +" + _NUM + r" ± +" + _NUM,
    "kld_mean": r"Mean +KLD: +" + _NUM + r" ± +" + _NUM,
    "kld_max": r"Maximum KLD: +" + _NUM,
    "kld_p999": r"99\.9% +KLD: +" + _NUM,
    "kld_p99": r"99\.0% +KLD: +" + _NUM,
    "kld_median": r"Median +KLD: +" + _NUM,
    "rms_dp": r"RMS Δp +: +" + _NUM + r" ± +" + _NUM + " %",
    "top1": r"Same top p: +" + _NUM + r" ± +" + _NUM + " %",
}


class PerplexityError(Dsv4Error, RuntimeError):
    """llama-perplexity failed or printed no figures."""


@dataclass(frozen=True)
class KldResult:
    """The figures of one `--kl-divergence` run. Fractions, not percent: `top1` and `rms_dp`.

    The percentiles and the median are None only when llama.cpp's final block was lost (see the module docstring).
    """

    ppl: float
    ppl_err: float
    ppl_ref: float
    ppl_ref_err: float
    kld_mean: float
    kld_mean_err: float
    kld_median: float | None
    kld_p99: float | None  # 99.0 % of tokens have a smaller KLD
    kld_p999: float | None  # 99.9 %
    kld_max: float | None
    top1: float
    rms_dp: float
    chunks: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def tool_argv(binary: Path, load_args: Sequence[str], ctx: int, extra: Sequence[str]) -> list[str]:
    """The command line: the plan's flags with the evaluation context (`-c` is the chunk length here)."""
    args = list(load_args)
    if "-c" in args:
        args[args.index("-c") + 1] = str(ctx)
    else:
        args += ["-c", str(ctx)]
    return [str(binary), *args, *extra]


def run_tool(argv: Sequence[str], log: Path, on_chunk: Callable[[int], None]) -> str:
    """Run llama-perplexity, its stdout and stderr into `log` as they come; `on_chunk(n)` hears each chunk done.

    Ctrl-C (or any exception) stops the child's process group before it propagates. Returns the whole output.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    text = bytearray()
    seen = 0
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
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
    return " | ".join(lines[-n:]) or "it printed nothing (llama.cpp's log thread was not flushed)"


def parse_base(output: str, log: Path) -> tuple[float, float]:
    """The reference's PPL and its ± from a `--kl-divergence-base` run."""
    found = _FINAL_BASE.search(output)
    if not found:
        raise PerplexityError(f"{TOOL} printed no final perplexity (log: {log}): {_tail(output)}")
    return float(found.group(1)), float(found.group(2))


def parse_kld(output: str, log: Path) -> KldResult:
    """The figures of a `--kl-divergence` run: the final statistics block, else the last per-chunk row."""
    rows = list(_KLD_ROW.finditer(output))
    if not rows:
        raise PerplexityError(f"{TOOL} computed no chunk (log: {log}): {_tail(output)}")
    last = [float(x) for x in rows[-1].groups()]
    chunks = int(last[0])
    stats = {key: re.search(pattern, output) for key, pattern in _STATS.items()}
    if stats["ppl"] is None or stats["kld_mean"] is None:  # the final block was lost: the cumulative last row
        return KldResult(
            ppl=last[1], ppl_err=last[2], ppl_ref=float("nan"), ppl_ref_err=float("nan"),
            kld_mean=last[5], kld_mean_err=last[6], kld_median=None, kld_p99=None, kld_p999=None, kld_max=None,
            top1=last[9] / 100, rms_dp=last[7] / 100, chunks=chunks,
        )  # fmt: skip

    def value(key: str, group: int = 1) -> float:
        found = stats[key]
        if found is None:
            raise PerplexityError(f"{TOOL}'s statistics have no {key} (log: {log})")
        return float(found.group(group))

    return KldResult(
        ppl=value("ppl"), ppl_err=value("ppl", 2), ppl_ref=value("ppl_ref"), ppl_ref_err=value("ppl_ref", 2),
        kld_mean=value("kld_mean"), kld_mean_err=value("kld_mean", 2), kld_median=value("kld_median"),
        kld_p99=value("kld_p99"), kld_p999=value("kld_p999"), kld_max=value("kld_max"),
        top1=value("top1") / 100, rms_dp=value("rms_dp") / 100, chunks=chunks,
    )  # fmt: skip
