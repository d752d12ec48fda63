"""One measurement: the engine build's `llama-bench` on the model with one plan's load parameters.

llama-bench loads the model once, runs a prefill test (`-p`) and a decode test (`-n`) `reps` times each after a
warm-up, and prints JSON. The speed kept is the best repetition of each (another process on a shared machine only
ever slows a run down), with the spread of the repetitions as this run's noise. A run that aborts (a setting
llama.cpp cannot run) or outlasts its timeout is a `BenchError`, so the search skips that setting.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.engine.params import LoadParams
from dsv4cli.errors import Dsv4Error


class BenchError(Dsv4Error):
    """llama-bench failed, timed out or printed no result for one setting."""


@dataclass(frozen=True)
class Measurement:
    pp_tps: float  # prefill tokens/s (best repetition)
    tg_tps: float  # decode tokens/s (best repetition)
    spread: float  # (best - worst) / best over the repetitions of both tests: this run's noise
    seconds: float  # wall time of the run, load included (what the next run will cost)

    def to_dict(self) -> dict[str, float]:
        return {"pp_tps": round(self.pp_tps, 3), "tg_tps": round(self.tg_tps, 3), "spread": round(self.spread, 4)}


def bench_args(params: LoadParams, model: Path, *, n_prompt: int, n_gen: int, reps: int) -> list[str]:
    """llama-bench flags for `params` (its names differ from llama-server's: `--repack 0|1`, `-lm`, `-ts a/b`)."""
    args = ["-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps), "-o", "json"]
    args += ["-t", str(params.n_threads), "-b", str(params.n_batch), "-ub", str(params.n_ubatch)]
    args += ["-ctk", params.kv_type, "-ctv", params.kv_type, "-fa", "on" if params.flash_attn else "off"]
    args += ["-ngl", str(params.n_gpu_layers), "--repack", "1" if params.repack() else "0"]
    args += ["-lm", params.load_mode() or "mmap"]
    if params.host_tensors:
        args += ["-ot", ";".join(f"{p}=CPU" for p in params.host_tensors)]
    if params.tensor_split:
        args += ["-ts", "/".join(f"{x:g}" for x in params.tensor_split)]
    if params.rpc:
        args += ["--rpc", ",".join(params.rpc)]
    return args


def run_bench(
    binary: Path, model: Path, params: LoadParams, *, n_prompt: int, n_gen: int, reps: int, timeout: float
) -> Measurement:
    """Run llama-bench once; BenchError when it fails, times out or prints nothing usable."""
    argv = [str(binary), *bench_args(params, model, n_prompt=n_prompt, n_gen=n_gen, reps=reps)]
    if timeout <= 0:
        raise BenchError("no time left in the budget")
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, errors="replace")
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"llama-bench ran past its {timeout:.0f} s") from e
    seconds = time.perf_counter() - start
    if proc.returncode:
        lines = [ln for ln in proc.stderr.splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()]
        raise BenchError(f"llama-bench failed ({(lines or ['exit status ' + str(proc.returncode)])[-1].strip()})")
    try:
        tests = json.loads(proc.stdout)
        pp = [float(s) for t in tests if t["n_prompt"] and not t["n_gen"] for s in t["samples_ts"]]
        tg = [float(s) for t in tests if t["n_gen"] and not t["n_prompt"] for s in t["samples_ts"]]
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError(f"llama-bench printed no result ({e})") from e
    if not pp or not tg or min(pp + tg) <= 0:
        raise BenchError("llama-bench printed no prefill or decode result")
    spread = max((max(s) - min(s)) / max(s) for s in (pp, tg))
    return Measurement(pp_tps=max(pp), tg_tps=max(tg), spread=spread, seconds=seconds)
