"""Calibration: what llama.cpp's own kernels do on this machine, measured instead of assumed.

Four small generated deepseek4 models in the recipe being planned decode a few tokens each, in a child process
(an abort there cannot take the plan down), with the thread count the plan uses:

* `overhead` and `short`: the tiny widths at 6 and 3 layers, where weights are negligible — seconds per layer
  (a layer's ~170 graph nodes: thread barriers, small ops, hyper-connections) and seconds per token outside the
  layers (sampling, logits, the Python binding);
* `dense`: wide dense projections and tiny experts — seconds per byte of dense weights (the `dense` recipe's GEMV);
* `experts`: wide experts and narrow dense projections — seconds per byte of active expert weights.

Each run's time is per token + layers·(per layer) + dense bytes·(per byte) + expert bytes·(per byte); the four
runs give the four terms (`solve`). On one thread the clock is CPU time, so a shared machine's other
processes do not inflate the figures (`decode_seconds`). The figures are
cached in `$DSV4_HOME/machine.json` (next to `dsv4 doctor`'s bandwidths) under a key naming the CPU, its flags,
the llama.cpp build, the recipe and the threads: another CPU, an upgraded llama-cpp-python or another recipe
measures again. The generated models stay in `$DSV4_HOME/calibration/` so a re-measure only decodes.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsv4cli.errors import PlanError
from dsv4cli.system import hardware

CHUNKS = 10
CHUNK_S = 0.05
CHILD_TIMEOUT_S = 300
# Widths of the generated models (config.json names); the rest comes from the tiny model's config.
WIDE = {
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "o_lora_rank": 1024,
    "o_groups": 4,
    "index_n_heads": 16,
    "index_head_dim": 128,
    "sliding_window": 128,
    "index_topk": 64,
}
SHAPES = {
    "overhead": {"num_hidden_layers": 6, "compress_ratios": [0, 0, 4, 128, 4, 128, 0]},
    "short": {"num_hidden_layers": 3, "compress_ratios": [0, 4, 128, 0]},
    "dense": {**WIDE, "num_hidden_layers": 2, "moe_intermediate_size": 64, "n_routed_experts": 8,
              "num_experts_per_tok": 2, "compress_ratios": [0, 4, 0]},
    "experts": {**WIDE, "num_attention_heads": 4, "num_hidden_layers": 2, "moe_intermediate_size": 2048,
                "n_routed_experts": 8, "num_experts_per_tok": 7, "compress_ratios": [0, 4, 0]},
}  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    """Per-token costs of llama.cpp's CPU kernels here, at `threads` threads, for one recipe."""

    token_s: float  # seconds per token outside the layers (sampling, logits, the Python binding)
    layer_s: float  # seconds per layer per token beyond its weight reads (graph nodes, small ops)
    dense_gbs: float  # GB/s of dense weights through the dense recipe's GEMV
    expert_gbs: float  # GB/s of active expert weights through the expert recipe's GEMV
    threads: int
    experts: str
    dense: str
    key: str
    measured_at: float


def cache_key(*, experts: str, dense: str, threads: int) -> str:
    """CPU model and flags, llama.cpp build, recipe and threads: anything that changes the kernels' speed."""
    from dsv4cli.system import llama_lib

    build = llama_lib.build_info()
    cpu = hashlib.sha256(f"{hardware.cpu_model()}|{' '.join(sorted(hardware.cpu_flags()))}".encode()).hexdigest()[:16]
    # v3: decoded with flash attention on, the plans' default since it measured faster on CPUs (v2 had it off)
    return f"v3|cpu-{cpu}|llama-{build.version}-{build.ggml_commit}|{experts}/{dense}|t{threads}"


def calibration(folder: Path, *, experts: str, dense: str, threads: int, remeasure: bool = False) -> Calibration:
    """The cached calibration for this machine, build, recipe and thread count, measured first if missing."""
    key = cache_key(experts=experts, dense=dense, threads=threads)
    cached = hardware.read_machine_cache(folder).get("calibration", {})
    if not remeasure and isinstance(cached.get(key), dict):
        try:
            return Calibration(**cached[key])
        except TypeError:
            pass
    result = measure(folder, experts=experts, dense=dense, threads=threads, key=key)
    latest = hardware.read_machine_cache(folder).get("calibration", {})
    hardware.update_machine_cache(folder, {"calibration": {**latest, key: asdict(result)}})
    return result


def measure(folder: Path, *, experts: str, dense: str, threads: int, key: str) -> Calibration:
    """Decode the three calibration models and solve for the per-layer, dense and expert costs."""
    from dsv4cli.load.model_file import open_model_file
    from dsv4cli.plan.groups import tensor_class

    runs = {}
    for name in [*SHAPES, *SHAPES]:  # two rounds, interleaved: a busy moment spoils one run of each, not the fit
        path = calibration_model(folder, name, experts=experts, dense=dense)
        src = open_model_file(path).source  # checked as every load is, before the child's llama.cpp sees it
        n_active = src.dims.n_expert_used / src.dims.n_expert
        dense_b = expert_b = 0.0
        for spec in src.tensors:
            cls = tensor_class(spec.name, src.dims.n_layer)
            if cls == "routed_experts":
                expert_b += spec.nbytes * n_active
            elif cls not in ("token_embd", "mtp"):
                dense_b += spec.nbytes
        seconds = min(_decode_seconds(path, threads), runs[name][0] if name in runs else float("inf"))
        runs[name] = (seconds, src.dims.n_layer, dense_b, expert_b)
    token_s, layer_s, dense_s, expert_s = solve([runs[name] for name in SHAPES])
    return Calibration(
        token_s=token_s,
        layer_s=layer_s,
        dense_gbs=1e-9 / dense_s,
        expert_gbs=1e-9 / expert_s,
        threads=threads,
        experts=experts,
        dense=dense,
        key=key,
        measured_at=time.time(),
    )


def solve(runs: list[tuple[float, int, float, float]]) -> tuple[float, float, float, float]:
    """Seconds per token, per layer, per dense byte and per expert byte from (seconds, layers, dense bytes, expert
    bytes) of the overhead, short, dense and experts runs: the exact 4x4 solution; with a negative per-token term,
    none and least squares for the rest; where noise still makes a term non-positive, the runs in turn with the
    terms before them subtracted (each rate keeps at least a tenth of its run's time)."""
    import numpy as np

    a = np.array([[1.0, n, d, e] for _, n, d, e in runs], dtype=np.float64)
    t = np.array([r[0] for r in runs], dtype=np.float64)
    try:
        exact = np.linalg.solve(a, t)
    except np.linalg.LinAlgError:
        exact = np.zeros(4)
    if exact[0] >= 0 and (exact[1:] > 0).all():
        return float(exact[0]), float(exact[1]), float(exact[2]), float(exact[3])
    # a per-token cost below the noise: no such term, least squares for the other three
    rest = np.linalg.lstsq(a[:, 1:], t, rcond=None)[0]
    if (rest > 0).all():
        return 0.0, float(rest[0]), float(rest[1]), float(rest[2])
    (t_o, n_o, _, _), (t_s, n_s, _, _), (t_d, n_d, d_d, _), (t_e, n_e, d_e, e_e) = runs
    layer_s = max(t_o - t_s, t_o * 0.1) / max(n_o - n_s, 1)
    token_s = max(t_s - n_s * layer_s, 0.0)
    dense_s = max(t_d - token_s - n_d * layer_s, t_d * 0.1) / d_d
    expert_s = max(t_e - token_s - n_e * layer_s - d_e * dense_s, t_e * 0.1) / e_e
    return token_s, layer_s, dense_s, expert_s


def calibration_model(folder: Path, name: str, *, experts: str, dense: str) -> Path:
    """A generated calibration GGUF, written once under `folder`/calibration (a temp name, then renamed)."""
    from dsv4cli.models.registry import ModelSpec, get_model
    from dsv4cli.models.tiny import write_tiny_checkpoint
    from quant.convert import QuantOptions, quantize_checkpoint

    out = folder / "calibration" / f"{name}-{experts}-{dense}.gguf"
    if out.is_file():
        return out
    tiny = get_model("tiny")
    spec = ModelSpec(name=f"calibration-{name}", builtin=True, config={**tiny.config, **SHAPES[name]})
    checkpoint = folder / "calibration" / f".{name}-{experts}-{dense}.checkpoint"
    write_tiny_checkpoint(spec, checkpoint, max_params=None)  # our own shapes, larger than a registry entry may be
    try:
        quantize_checkpoint(checkpoint, out, QuantOptions(experts=experts, dense=dense))
    finally:
        import shutil

        shutil.rmtree(checkpoint, ignore_errors=True)
    for report in out.parent.glob(f"{out.stem}*.json"):
        report.unlink(missing_ok=True)
    return out


def _decode_seconds(path: Path, threads: int) -> float:
    """Seconds per decoded token, the best of CHUNKS timed chunks, from a child process."""
    code = "import sys; from dsv4cli.plan.calibrate import child; child(sys.argv[1], int(sys.argv[2]))"
    argv = [sys.executable, "-c", code, str(path), str(threads)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, errors="replace")
    except subprocess.TimeoutExpired as e:
        raise PlanError(f"calibration: decoding {path.name} took over {CHILD_TIMEOUT_S} s") from e
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SECONDS_PER_TOKEN ")]
    if proc.returncode or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise PlanError(
            f"calibration: llama.cpp could not decode {path} ({tail[0]})",
            hint="run `dsv4 doctor`, or plan with --cpu-gbs to skip the measurement",
        )
    value = float(lines[-1].split()[1])
    if not math.isfinite(value) or value <= 0:
        raise PlanError(f"calibration: a nonsensical time from {path.name}: {value}")
    return value


def decode_seconds(llm: Any, *, threads: int = 1) -> float:
    """Steady-state seconds per decoded token of a loaded `llama_cpp.Llama`: a short prompt and one warm-up token
    (first-touch page faults, repacking), then the best of CHUNKS chunks of at least CHUNK_S each. On one thread
    the clock is the process's CPU time, so other processes sharing the cores do not count (on an idle machine it
    equals wall time); with more threads it is wall time. `bench/plan.py` measures the same way, so prediction
    and check agree on what a token costs."""
    clock = time.process_time if threads == 1 else time.perf_counter
    llm.eval(llm.tokenize(b"The quick brown fox", add_bos=False))
    llm.eval([llm.sample(temp=0.0)])
    times = []
    for _ in range(CHUNKS):
        start, n = clock(), 0
        while n < 2 or clock() - start < CHUNK_S:
            llm.eval([llm.sample(temp=0.0)])
            n += 1
        times.append((clock() - start) / n)
    return min(times)


def child(path: str, threads: int) -> None:
    """The calibration child: load `path` and print its steady-state seconds per token."""
    from llama_cpp import Llama

    from dsv4cli.system.llama_lib import apply_to_llama_class

    apply_to_llama_class()
    llm = Llama(
        path, n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=threads, verbose=False, swa_full=False, flash_attn=True
    )
    print(f"SECONDS_PER_TOKEN {decode_seconds(llm, threads=threads)}", flush=True)
