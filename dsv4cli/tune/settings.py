"""The settings `dsv4 tune` measures, and the candidates tried for each.

Each is a plan input (`PlanInputs`), so a tuned setting reaches llama.cpp through the same plan as a flag would:
flash attention, CPU threads, weight repacking, the micro-batch (the batch equals it, as in every plan), the KV
cache type and the load mode (mmap or read into memory); with layers on a GPU also how many layers' experts go
to VRAM (the rest stay in host RAM) and larger micro-batches, which let llama.cpp ship host experts to the GPU
for prefill.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dsv4cli.engine.kvcache import KV_TYPES

CPU_UBATCHES = (128, 256, 512)
GPU_UBATCHES = (512, 1024, 2048)  # prefill offload: big micro-batches amortize shipping experts over PCIe
QUANTIZED_KV = tuple(t for t in KV_TYPES if t != "f16")


@dataclass(frozen=True)
class Settings:
    flash_attn: bool
    threads: int
    repack: bool
    ubatch: int
    kv_type: str
    mmap: bool
    gpu_expert_layers: int | None = None  # layers whose experts are in VRAM; None: no GPU

    def valid(self) -> bool:
        """llama.cpp runs a quantized KV cache only with flash attention."""
        return self.flash_attn or self.kv_type == "f16"

    def label(self) -> str:
        """One short line for progress: `fa=on t=2 repack=off ub=512 kv=f16 mmap=off`."""
        parts = [
            f"fa={'on' if self.flash_attn else 'off'}",
            f"t={self.threads}",
            f"repack={'on' if self.repack else 'off'}",
            f"ub={self.ubatch}",
            f"kv={self.kv_type}",
            f"mmap={'on' if self.mmap else 'off'}",
        ]
        if self.gpu_expert_layers is not None:
            parts.append(f"gpu-experts={self.gpu_expert_layers}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Settings:
        """Settings from a cache file; ValueError naming the first bad field (a damaged or hand-edited file)."""
        if not isinstance(data, dict):
            raise ValueError("settings are not an object")
        kinds = {"flash_attn": bool, "repack": bool, "mmap": bool, "threads": int, "ubatch": int, "kv_type": str}
        for name, kind in kinds.items():
            value = data.get(name)
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or not 1 <= value <= 1 << 16)):
                raise ValueError(f"settings.{name} is {value!r}")
        if data["kv_type"] not in KV_TYPES:
            raise ValueError(f"settings.kv_type is {data['kv_type']!r}")
        layers = data.get("gpu_expert_layers")
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
            raise ValueError(f"settings.gpu_expert_layers is {layers!r}")
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


def dimensions(start: Settings, *, physical: int, logical: int, repack_ok: bool) -> list[tuple[str, tuple[Any, ...]]]:
    """(setting, candidates) in the order the search tries them: the ones that move speed most first, the KV type
    (which must also pass the output check) last. Repacking is tried only where this build may repack (not on AMX
    CPUs: `llama_lib.use_extra_bufts`); a setting with one candidate is left out."""
    threads = sorted({physical, logical} | ({physical // 2} if physical >= 8 else set()))
    gpu = start.gpu_expert_layers is not None
    dims: list[tuple[str, tuple[Any, ...]]] = []
    if gpu and start.gpu_expert_layers:
        n = start.gpu_expert_layers
        dims.append(("gpu_expert_layers", tuple(sorted({n, max(0, n - 2), n // 2}, reverse=True))))
    dims += [
        ("flash_attn", (True, False)),
        ("threads", tuple(threads)),
        ("ubatch", GPU_UBATCHES if gpu else CPU_UBATCHES),
        ("repack", (True, False) if repack_ok else (False,)),
        ("mmap", (False, True)),
        ("kv_type", ("f16", *QUANTIZED_KV)),
    ]
    return [(name, values) for name, values in dims if len(values) > 1]


def with_value(settings: Settings, name: str, value: Any) -> Settings:
    return replace(settings, **{name: value})
