"""What this machine has: GPUs and their memory, host RAM, and the bandwidths the speed model divides by.

Detection never fails: no NVML, no nvidia-smi and no rocm-smi simply means no GPU. Default bandwidths are
effective (not peak) figures; `measure_*` replace them with numbers taken here, cached per machine.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dsv4cli.atomic import write_text_atomic

GB = 1e9

# Effective decode-time bandwidths (GB/s): roughly 80 % of the spec sheet for GPUs (docs/formats.md §Hardware figures).
GPU_BANDWIDTH = {
    "5090": 1500.0,
    "4090": 850.0,
    "3090": 800.0,
    "4080": 600.0,
    "4070": 420.0,
    "3080": 640.0,
    "A100": 1600.0,
    "H100": 2700.0,
    "H200": 3900.0,
    "L40": 700.0,
    "A6000": 650.0,
}
DEFAULT_GPU_BW = 500.0
DEFAULT_RAM_BW = 60.0  # dual-channel DDR5 effective; 8-channel servers reach 150+
DEFAULT_DISK_BW = 3.0  # one PCIe 4.0 NVMe, sequential
DEFAULT_PCIE_BW = 25.0  # PCIe 4.0 x16 effective
DEFAULT_NET_BW = 0.117  # 1 Gb Ethernet, when a transfer to an RPC worker could not be measured


@dataclass(frozen=True)
class Gpu:
    name: str
    total_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes


@dataclass(frozen=True)
class GpuScan:
    gpus: tuple[Gpu, ...]
    source: str  # "nvml", "nvidia-smi", "rocm-smi" or "none"


def detect_gpus() -> GpuScan:
    """NVIDIA GPUs through NVML (pynvml) if importable, else nvidia-smi, then AMD GPUs through rocm-smi."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                name = pynvml.nvmlDeviceGetName(handle)
                gpus.append(Gpu(name.decode() if isinstance(name, bytes) else name, mem.total, mem.used))
            return GpuScan(tuple(gpus), "nvml")
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # any NVML failure (not installed, no driver) means: try nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=name,memory.total,memory.used", "--format=csv,noheader,nounits"]
        try:
            lines = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            lines = ""
        gpus = []
        for line in lines.strip().splitlines():
            name, total, used = (part.strip() for part in line.rsplit(",", 2))
            gpus.append(Gpu(name, int(float(total)) * 2**20, int(float(used)) * 2**20))
        if gpus:
            return GpuScan(tuple(gpus), "nvidia-smi")
    return _rocm_smi()


def _rocm_smi() -> GpuScan:
    """AMD GPUs from `rocm-smi --showproductname --showmeminfo vram --json` (one object per card)."""
    smi = shutil.which("rocm-smi")
    if not smi:
        return GpuScan((), "none")
    query = [smi, "--showproductname", "--showmeminfo", "vram", "--json"]
    try:
        cards = json.loads(subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout)
        gpus = [
            Gpu(
                str(card.get("Card Series") or card.get("Card series") or card.get("Card model") or key),
                int(card["VRAM Total Memory (B)"]),
                int(card["VRAM Total Used Memory (B)"]),
            )
            for key, card in sorted(cards.items(), key=lambda item: (len(item[0]), item[0]))  # card2 < card10
            if key.startswith("card")
        ]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError, AttributeError):
        return GpuScan((), "none")
    return GpuScan(tuple(gpus), "rocm-smi" if gpus else "none")


def gpu_bandwidth(name: str) -> float:
    """Effective GB/s for a GPU name (substring match on the model number), or a middling default."""
    for key, bandwidth in GPU_BANDWIDTH.items():
        if key.lower() in name.lower():
            return bandwidth
    return DEFAULT_GPU_BW


def available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def total_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _cpuinfo_field(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of `keys` (None where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(keys):
            return line.partition(":")[2].strip()
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo_field("flags", "Features") or "").split())


def cpu_threads() -> int:
    """Physical cores: llama.cpp decode gains nothing from hyper-threads."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def measure_ram_bandwidth(*, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Host RAM read GB/s: best of `repeats` sums over an array far larger than any CPU cache."""
    import numpy as np

    data = np.ones(nbytes // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / GB


def measure_disk_bandwidth(folder: Path, *, nbytes: int = 256 * 2**20) -> float:
    """Sequential read GB/s of a fresh temp file in `folder`, with its pages dropped from the cache first.

    O_DIRECT is not portable and needs aligned buffers, so the file is written, fsync'd and evicted with
    posix_fadvise(DONTNEED) — the kernel then has to read it from the device.
    """
    block = os.urandom(4 * 2**20)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".dsv4-bw-") as tmp:
        for _ in range(nbytes // len(block)):
            tmp.write(block)
        tmp.flush()
        os.fsync(tmp.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(tmp.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with open(tmp.name, "rb", buffering=0) as f:
            start = time.perf_counter()
            while f.read(len(block)):
                pass
            elapsed = time.perf_counter() - start
    return nbytes / elapsed / GB


@dataclass(frozen=True)
class Bandwidths:
    """Measured read bandwidths (GB/s) of this machine, and where and when they were taken."""

    ram_gbs: float
    disk_gbs: float
    folder: str
    machine: str
    measured_at: float
    cached: bool = False


def machine_id() -> str:
    """Identifies this machine across runs (a shared dsv4 home may be used by several)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return f"{platform.node()}-{platform.machine()}"


def cpu_model() -> str:
    """The CPU's model name (e.g. "AMD EPYC 9B14"), part of the calibration cache key."""
    name = _cpuinfo_field("model name", "Model", "Hardware")
    return name if name is not None else platform.processor() or platform.machine()


def read_machine_cache(folder: Path) -> dict[str, Any]:
    """`folder`/machine.json when it was written on this machine for this folder, else {}."""
    try:
        data = json.loads((folder / "machine.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("machine") != machine_id() or data.get("folder") != str(folder):
        return {}
    return data


def update_machine_cache(folder: Path, entries: dict[str, Any]) -> None:
    """Merge `entries` into `folder`/machine.json: a temporary name, then a rename, so no reader sees a torn file."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {**read_machine_cache(folder), **entries, "machine": machine_id(), "folder": str(folder)}
    write_text_atomic(folder / "machine.json", json.dumps(data, indent=2) + "\n")


def measured_bandwidths(folder: Path, *, remeasure: bool = False) -> Bandwidths:
    """RAM and disk read GB/s, measured once per machine and disk folder and cached in `folder`/machine.json.

    Takes a few seconds the first time (or with `remeasure`); the cache also holds the plan's calibration
    (`dsv4cli.plan.calibrate`), which this keeps.
    """
    data = read_machine_cache(folder)
    names = [f.name for f in fields(Bandwidths) if f.name != "cached"]
    if not remeasure and all(name in data for name in names):
        try:
            return Bandwidths(**{name: data[name] for name in names}, cached=True)
        except TypeError:
            pass
    folder.mkdir(parents=True, exist_ok=True)
    result = Bandwidths(
        ram_gbs=round(measure_ram_bandwidth(), 2),
        disk_gbs=round(measure_disk_bandwidth(folder), 2),
        folder=str(folder),
        machine=machine_id(),
        measured_at=time.time(),
    )
    update_machine_cache(folder, {name: getattr(result, name) for name in names})
    return result
