"""`dsv4 doctor`: what this machine and this install can do for DeepSeek V4, and what to fix first.

Facts come from the loaded llama.cpp build (`dsv4cli.system.llama_lib`), the GPU tools
(`dsv4cli.system.hardware`), the OS (psutil, statvfs, /proc/cpuinfo) and a short bandwidth measurement cached per
machine. Each problem carries the command that fixes it.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from dsv4cli.errors import Dsv4Error
from dsv4cli.home import dsv4_home
from dsv4cli.system import hardware

GB = 1e9
MIN_FREE_DISK = 50 * GB  # a quantized Flash model plus headroom; Pro needs far more, plan says how much
MIN_RAM = 16 * GB
# CPU flags (as /proc/cpuinfo spells them) that ggml kernels use, with the name llama_print_system_info gives.
SIMD_FEATURES = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_vnni": "AVX512_VNNI", "amx_int8": "AMX_INT8"}


@dataclass(frozen=True)
class Problem:
    message: str
    fix: str


@dataclass
class Report:
    llama: dict[str, Any] | None  # llama_lib.BuildInfo.to_dict(), None when llama-cpp-python does not load
    gpus: list[dict[str, Any]]
    gpu_source: str
    cpu: dict[str, Any]
    ram: dict[str, int]
    disk: dict[str, Any]
    bandwidth: dict[str, Any] | None
    engine: dict[str, Any]  # the llama-server `dsv4 serve` runs: ServerBinary.to_json(), or {"error": why not}
    problems: list[Problem] = field(default_factory=list)
    calibration: list[dict[str, Any]] = field(default_factory=list)  # dsv4cli.plan.calibrate, cached entries

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def serve_engine() -> dict[str, Any]:
    """Which llama-server `dsv4 serve` would run and its version, or why there is none (not built, a bad
    `$DSV4_ENGINE_BIN`); no problem either way: chat does not need it."""
    from dsv4cli.toolchain.build import EngineError, find_engine

    try:
        return find_engine().to_json()
    except EngineError as e:
        return {"error": f"{e}: {e.hint}" if e.hint else str(e)}


def diagnose(*, remeasure: bool = False, measure: bool = True) -> Report:
    """Collect the facts and the problems; `measure` takes the bandwidths (cached per machine unless `remeasure`)."""
    import psutil

    from dsv4cli.system import llama_lib

    problems: list[Problem] = []
    try:
        build = llama_lib.build_info()
    except (Dsv4Error, ImportError, OSError) as e:
        build = None
        problems.append(Problem(f"llama-cpp-python does not load: {e}", "make setup"))
    scan = hardware.detect_gpus()
    if scan.gpus and build and not build.gpu_offload:
        names = ", ".join(g.name for g in scan.gpus)
        kind = llama_lib.gpu_kind(scan.source)
        problems.append(
            Problem(
                f"found {names} but this llama-cpp-python build is CPU-only: chat would not use the GPU",
                f"make setup GPU={kind}   # or: {llama_lib.gpu_build_command(kind)}",
            )
        )
    flags = hardware.cpu_flags()
    if build:
        missing = [name for flag, name in SIMD_FEATURES.items() if flag in flags and name not in build.cpu_features]
        if missing:
            problems.append(
                Problem(
                    f"this CPU has {', '.join(missing)} but the llama.cpp build does not use it (a generic build)",
                    'CMAKE_ARGS="-DGGML_NATIVE=on" pip install --force-reinstall --no-cache-dir '
                    f"llama-cpp-python=={build.version}",
                )
            )
    home = dsv4_home()
    existing = next(p for p in (home, *home.parents) if p.exists())
    usage = shutil.disk_usage(existing)
    if usage.free < MIN_FREE_DISK:
        problems.append(
            Problem(
                f"{usage.free / GB:.1f} GB free under {home}: a quantized DeepSeek V4 Flash needs about 160 GB",
                "free disk space, or point DSV4_HOME at a bigger disk (export DSV4_HOME=/big/disk/dsv4)",
            )
        )
    memory = psutil.virtual_memory()
    if memory.total < MIN_RAM:
        problems.append(
            Problem(
                f"{memory.total / GB:.1f} GB of RAM: only the tiny test model will run well",
                "plan for what fits: dsv4 plan deepseek-v4-flash",
            )
        )
    bandwidth = None
    engine = serve_engine()
    if measure:
        bandwidth = asdict(hardware.measured_bandwidths(home, remeasure=remeasure))
    return Report(
        llama=build.to_dict() if build else None,
        gpus=[{"name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes} for g in scan.gpus],
        gpu_source=scan.source,
        cpu={
            "machine": os.uname().machine if hasattr(os, "uname") else sys.platform,
            "physical_cores": hardware.cpu_threads(),
            "logical_cores": os.cpu_count() or 1,
            "features": sorted(flag for flag in flags if flag in SIMD_FEATURES or flag.startswith(("avx", "amx"))),
        },
        ram={"total_bytes": int(memory.total), "available_bytes": int(memory.available)},
        disk={"home": str(home), "free_bytes": int(usage.free)},
        bandwidth=bandwidth,
        engine=engine,
        problems=problems,
        calibration=[
            c for c in hardware.read_machine_cache(home).get("calibration", {}).values() if isinstance(c, dict)
        ],
    )
