"""The plan's types: the memory tiers and the finished `Plan` with its load parameters (inputs: `inputs.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dsv4cli.engine.kvcache import DEFAULT_KV_TYPE, KvCache
from dsv4cli.engine.params import LoadParams
from dsv4cli.plan.groups import class_pattern, tensor_class
from dsv4cli.plan.inputs import DEFAULT_UBATCH, PlanInputs
from dsv4cli.plan.source import ModelSource
from dsv4cli.system import llama_lib

if TYPE_CHECKING:
    from pathlib import Path

    from dsv4cli.plan.machine import Machine


@dataclass
class Tier:
    name: str
    kind: str
    device: str
    budget: int | None
    bandwidth_gbs: float
    weights: int = 0
    kv: int = 0
    compute: int = 0
    margin: int = 0
    # an RPC worker's device: llama.cpp's `--rpc` endpoint, one round trip and the measured client-to-worker rate
    endpoint: str | None = None
    rtt_s: float = 0.0
    net_gbs: float = 0.0

    @property
    def used(self) -> int:
        return self.weights + self.kv + self.compute + self.margin

    @property
    def free(self) -> int:
        return (self.budget or 0) - self.used


@dataclass
class Plan:
    source: ModelSource
    inputs: PlanInputs
    tiers: list[Tier]
    placement: dict[str, str]
    kv: KvCache
    compute_gpu: int
    compute_host: int
    n_gpu_layers: int
    gpu_layer_counts: list[int]
    cpu_expert_layers: list[int]
    estimates: dict[str, Any]
    warnings: list[str]
    verdict: str
    vram_source: str
    ram_source: str
    reserve: int = 0  # host RAM kept free for the OS
    machine: Machine | None = None  # the figures the estimates used, with their sources
    hints: list[str] = field(default_factory=list)  # what would make a plan that streams from disk fit
    assumptions: dict[str, Any] = field(default_factory=dict)  # machine.assumptions: figure, unit, source
    tune_notes: list[str] = field(default_factory=list)  # why `dsv4 tune`'s result was not used (damaged file)

    def tier(self, name: str) -> Tier:
        return next(t for t in self.tiers if t.name == name)

    def class_rows(self) -> list[dict[str, Any]]:
        """(tier, class) -> count, bytes, in tier order."""
        rows: dict[tuple[str, str], list[int]] = {}
        for spec in self.source.tensors:
            key = (self.placement[spec.name], tensor_class(spec.name, self.source.dims.n_layer))
            acc = rows.setdefault(key, [0, 0])
            acc[0] += 1
            acc[1] += spec.nbytes
        order = {t.name: i for i, t in enumerate(self.tiers)} | {"skipped": len(self.tiers)}
        return [
            {"tier": tier, "class": cls, "count": n, "bytes": b}
            for (tier, cls), (n, b) in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))
        ]

    def load_params(self) -> LoadParams:
        """How llama.cpp should load the model to get this placement."""
        gpu = self.n_gpu_layers > 0
        patterns = []
        if gpu and self.cpu_expert_layers:
            layers = "|".join(str(i) for i in self.cpu_expert_layers)
            patterns.append(rf"^blk\.({layers})\.ffn_(gate|up|down)_exps\.")
        engram = any(tensor_class(s.name, self.source.dims.n_layer) == "engram" for s in self.source.tensors)
        if gpu and engram:
            patterns.append(class_pattern("engram"))
        # Layer counts per GPU: llama.cpp normalizes them and gives GPU i the next share of the offloaded
        # layers, so whole counts reproduce this plan's blocks exactly (rounded fractions can shift a boundary).
        # The counts follow llama.cpp's device order, RPC workers first (src/llama.cpp puts them at the front).
        split = tuple(float(n) for n in self.gpu_layer_counts) if len(self.gpu_layer_counts) > 1 else ()
        return LoadParams(
            n_ctx=self.kv.n_ctx,
            n_batch=self.inputs.ubatch or DEFAULT_UBATCH,
            n_ubatch=self.inputs.ubatch or DEFAULT_UBATCH,
            n_gpu_layers=self.n_gpu_layers,
            host_tensors=tuple(patterns),
            tensor_split=split,
            # mmap when anything is read from disk, and always for Engram tables (sparse lookups); else load it all
            use_mmap=any(t.kind == "disk" and t.weights for t in self.tiers) or engram or bool(self.inputs.mmap),
            flash_attn=flash_attn(self.inputs),
            kv_type=self.inputs.kv_type or DEFAULT_KV_TYPE,
            n_threads=self.inputs.threads,
            use_extra_bufts=llama_lib.use_extra_bufts(self.inputs.repack),  # decided here: chat and llama_args agree
            rpc=tuple(dict.fromkeys(t.endpoint for t in self.tiers if t.endpoint)),
        )

    def model_path(self) -> Path | None:
        """The GGUF this plan is for: the file planned, or where `dsv4 quantize` would write the estimated one."""
        return self.source.files[0] if self.source.files else self.source.target

    def llama_args(self) -> list[str]:
        """The equivalent llama-server command line (without the binary)."""
        model = self.model_path()
        return self.load_params().cli_args(str(model) if model else f"<{self.source.name}.gguf>")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`dsv4cli.plan.schema.SCHEMA`)."""
        from dsv4cli.plan.schema import plan_to_dict

        return plan_to_dict(self)


def flash_attn(inputs: PlanInputs) -> bool:
    """On unless turned off (by a flag or `dsv4 tune`), and always with a quantized cache (llama.cpp cannot make a
    context with a quantized V cache without it). At V4-Flash's widths on a CPU it is faster — one thread, CPU
    time: decode 1.03x, prefill (512 tokens) 1.17x; llama-bench, 2 threads: prefill 1.05-1.35x, decode
    1.12-1.21x — and its compute buffer is smaller (266 MiB against 1.37 GiB at a 32k context, ubatch 512)."""
    return inputs.flash_attn is not False or inputs.kv_type not in (None, DEFAULT_KV_TYPE)
