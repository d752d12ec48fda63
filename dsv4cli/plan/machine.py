"""The machine terms the speed model divides by, each with where it came from.

Every figure is `measured` (here: `dsv4 doctor`'s bandwidths, `dsv4 plan --calibrate`'s kernel timings, both
cached in `$DSV4_HOME/machine.json`), `flag` (given: planning for another machine), `detected` (read from the
OS or a GPU tool), `default` (a typical figure for hardware not measured yet) or `assumed` (a figure that cannot
be measured here, such as anything about a GPU on a machine without one). The plan prints the source next to
every figure, so a number that was never measured does not look like one that was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsv4cli.errors import Dsv4Error
from dsv4cli.home import dsv4_home
from dsv4cli.plan.calibrate import Calibration, cache_key, calibration
from dsv4cli.plan.inputs import PlanInputs
from dsv4cli.system import hardware

# Without a calibration: one core of a recent x86 CPU through llama.cpp's GEMV (GB/s of weights per thread) and
# the per-layer graph cost (~170 nodes at ~1.6 µs each on one thread). Replaced by `dsv4 plan --calibrate`.
DEFAULT_CPU_GBS = 4.0
DEFAULT_LAYER_S = 170 * 1.6e-6
DEFAULT_TOKEN_S = 3e-4
# GPU decode: a kernel launch per graph node, CUDA-graph replay (assumed: no GPU was measured).
GPU_NODE_S = 1e-6
NODES_PER_LAYER = 170
# Prefill GEMMs are compute bound; not calibrated (decode is): typical effective figures.
CPU_PREFILL_GFLOPS_PER_THREAD = 30.0
GPU_TFLOPS = 50.0
CALIBRATE_HINT = "run `dsv4 plan MODEL --calibrate` once to measure this machine"


@dataclass(frozen=True)
class Figure:
    value: Any  # a number, or a word (kv type, on/off)
    unit: str
    source: str  # measured | flag | detected | default | assumed

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "source": self.source}


@dataclass(frozen=True)
class Machine:
    """The figures one plan uses; `cpu_*` are per token at the plan's thread count."""

    threads: Figure
    ram_gbs: Figure
    disk_gbs: Figure
    pcie_gbs: Figure
    cpu_dense_gbs: Figure  # dense weights through the dense recipe's GEMV, all threads
    cpu_expert_gbs: Figure  # active expert weights through the expert recipe's GEMV, all threads
    cpu_layer_s: Figure  # per layer per token beyond the weight reads
    cpu_token_s: Figure  # per token outside the layers (sampling, logits, the Python binding)
    gpu_node_s: Figure
    notes: tuple[str, ...] = ()


def _pick(flag: float | None, measured: float | None, default: float, unit: str) -> Figure:
    if flag is not None:
        return Figure(flag, unit, "flag")
    if measured is not None:
        return Figure(measured, unit, "measured")
    return Figure(default, unit, "default")


def resolve_machine(inputs: PlanInputs, recipe: tuple[str, str], *, threads_source: str) -> Machine:
    """The figures for `inputs`: flags first, then this machine's cached measurements, then defaults.

    `inputs.measure` measures the bandwidths again; `inputs.calibrate` also times llama.cpp's kernels (a minute
    the first time: three small models are generated). Calibrations at more threads than this machine has cores
    are scaled from the figure at all its cores (the source says so).
    """
    home = dsv4_home()
    cached = hardware.read_machine_cache(home)
    if inputs.measure or inputs.calibrate:
        bw = hardware.measured_bandwidths(home, remeasure=True)
        cached = {**cached, "ram_gbs": bw.ram_gbs, "disk_gbs": bw.disk_gbs}
    threads = int(inputs.threads or 1)
    here = min(threads, hardware.cpu_threads())
    cal: Calibration | None = None
    notes: list[str] = []
    if inputs.cpu_gbs is None:
        if inputs.calibrate:
            cal = calibration(home, experts=recipe[0], dense=recipe[1], threads=here, remeasure=True)
        else:
            entry = cached.get("calibration", {}).get(_key(recipe, here))
            cal = Calibration(**entry) if isinstance(entry, dict) else None
            if cal is None:
                notes.append(f"CPU figures are defaults, not measured: {CALIBRATE_HINT}")
    scale = threads / here
    source = "measured" if scale == 1 else f"measured at {here} threads, scaled"
    if inputs.cpu_gbs is not None:
        dense = expert = Figure(inputs.cpu_gbs * threads, "GB/s", "flag")
    elif cal is not None:
        dense = Figure(cal.dense_gbs * scale, "GB/s", source)
        expert = Figure(cal.expert_gbs * scale, "GB/s", source)
    else:
        dense = expert = Figure(DEFAULT_CPU_GBS * threads, "GB/s", "default")
    return Machine(
        threads=Figure(threads, "", threads_source),
        ram_gbs=_pick(inputs.ram_bw, cached.get("ram_gbs"), hardware.DEFAULT_RAM_BW, "GB/s"),
        disk_gbs=_pick(inputs.disk_bw, cached.get("disk_gbs"), hardware.DEFAULT_DISK_BW, "GB/s"),
        pcie_gbs=Figure(inputs.pcie_bw, "GB/s", "flag")
        if inputs.pcie_bw
        else Figure(hardware.DEFAULT_PCIE_BW, "GB/s", "assumed"),
        cpu_dense_gbs=dense,
        cpu_expert_gbs=expert,
        cpu_layer_s=Figure(cal.layer_s, "s", "measured") if cal else Figure(DEFAULT_LAYER_S, "s", "default"),
        cpu_token_s=Figure(cal.token_s, "s", "measured") if cal else Figure(DEFAULT_TOKEN_S, "s", "default"),
        gpu_node_s=Figure(GPU_NODE_S, "s", "assumed"),
        notes=tuple(notes),
    )


def _key(recipe: tuple[str, str], threads: int) -> str | None:
    try:
        return cache_key(experts=recipe[0], dense=recipe[1], threads=threads)
    except (Dsv4Error, ImportError, OSError):  # no loadable llama.cpp: nothing was calibrated with it
        return None


def assumptions(machine: Machine, *, gpus: list[tuple[str, float, str]], context: dict[str, Figure]) -> dict[str, Any]:
    """Every figure the plan rests on, rounded as people read them, each with its source (the JSON form)."""
    figures = {
        "threads": machine.threads,
        "ram_bw": _round(machine.ram_gbs),
        "disk_bw": _round(machine.disk_gbs),
        "cpu_dense_gemv": _round(machine.cpu_dense_gbs),
        "cpu_expert_gemv": _round(machine.cpu_expert_gbs),
        "cpu_layer_cost": Figure(round(machine.cpu_layer_s.value * 1e3, 2), "ms", machine.cpu_layer_s.source),
        "token_cost": Figure(round(machine.cpu_token_s.value * 1e3, 2), "ms", machine.cpu_token_s.source),
    }
    if gpus:
        figures["pcie_bw"] = _round(machine.pcie_gbs)
        figures["gpu_node_cost"] = Figure(round(machine.gpu_node_s.value * 1e6, 1), "µs", machine.gpu_node_s.source)
        for name, gbs, source in gpus:
            figures[f"{name}_bw"] = _round(Figure(gbs, "GB/s", source))
    return {name: f.to_dict() for name, f in {**figures, **context}.items()}


def _round(figure: Figure) -> Figure:
    value = figure.value
    digits = 1 if value >= 1 else 2
    return Figure(round(value, digits), figure.unit, figure.source)
