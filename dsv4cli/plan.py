"""`dsv4 plan`: place every GGUF tensor on a GPU, in host RAM or memory-mapped from disk, and predict speed.

Inputs are exact (a GGUF's tensor headers; all shards of a split file) or estimated (a registry name or checkpoint
folder run through `quant.mapping.gguf_tensor_specs` for the chosen recipe, so nothing needs downloading).

Placement (issue 4):
1. The GPUs take what every token reads: each layer's attention, norms, router, shared expert and hyper-connection
   weights plus its KV cache, the output head, and one compute buffer per GPU. Layers are offloaded from the top
   down as llama.cpp's `-ngl` does; when VRAM cannot hold them all, the lowest layers stay on the host whole.
2. Routed experts go to host RAM; VRAM left over takes whole expert layers, **highest layer first**, so the
   experts left on the host are layers 0..N-1 — exactly llama.cpp's `--n-cpu-moe N`.
3. `token_embd` stays on the host (llama.cpp reads only the looked-up rows); Engram tables never go to a GPU.
4. Host RAM holds, in order: what must be resident (embedding, host layers, their KV, the host compute buffer),
   routed experts, then Engram tables (their lookups are sparse, so they are the best thing to leave on disk).
   What RAM cannot hold is memory-mapped from disk, with a warning and its cost in the speed estimate; with
   `no_disk` that is an error saying by how much RAM is short.

Speed: decode tok/s = 1 / (Σ_tier(bytes read per token from the tier / its bandwidth) + graph overhead), where the
host side is a roofline: max(RAM + disk time, CPU compute time (2·host_active_params + attention FLOPs at a full
cache, kvcache.attention_flops) / (GFLOPS·threads)); GPU attention FLOPs add a gpu_compute term. Per token:
every GPU-resident dense byte, k/E of each tier's expert bytes, the KV read, host dense layers, Engram rows (a 4 KiB
page each from disk); the overhead is a fixed cost per graph node (see NODES_PER_LAYER). Prefill per n_ubatch
chunk: dense bytes once, the fraction of experts a chunk touches (1 − (1 − k/E)^ub) once — over PCIe when a GPU
computes the chunk — plus a compute term 2·active_params·ub / FLOPS.

SCHEMA documents `Plan.to_dict()` (what `--json` prints and `-o` writes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4cli import hardware, llama_lib
from dsv4cli.errors import PlanError, UsageError
from dsv4cli.home import dsv4_home
from dsv4cli.kvcache import CSA_RATIO, KV_TYPES, KvCache, ModelDims, attention_flops, compute_buffer_bytes, kv_cache
from dsv4cli.local import default_gguf_path
from dsv4cli.registry import ARCHES, get_model
from dsv4cli.ui import human_bytes

GIB = 2**30
PAGE = 4096
DEFAULT_CTX = 32768
DEFAULT_UBATCH = 512
DEFAULT_MARGIN_GIB = 1.0
CPU_GFLOPS_PER_CORE = 30.0  # quantized GEMV, one core (fitted on a 2-core EPYC, AVX-512, with bench/plan.py)
GPU_TFLOPS = 50.0  # quantized matmul on a consumer GPU, rough
# Fixed cost of running a layer's graph once: llama.cpp's deepseek4 graph has ~170 nodes per layer (686 for the
# 4-layer tiny model: hyper-connection Sinkhorn iterations, compressors, indexer), each paying a thread barrier
# on the CPU (~1.6 µs per node on a 2-core EPYC, one thread) or a kernel launch on a GPU (~4 µs, unmeasured).
NODES_PER_LAYER = 170
CPU_NODE_SECONDS = 1.6e-6
GPU_NODE_SECONDS = 4e-6

SCHEMA = """\
{
  "schema": "dsv4.plan/1",
  "source": {"kind": "gguf" | "estimate", "name": str, "arch": "deepseek4" | "deepseek41",
             "files": [path, ...] (gguf only), "recipe": {"experts": str, "dense": str} | null,
             "file_bytes": int (sum of tensor bytes)},
  "inputs": {"ctx": int (requested), "n_ctx": int (padded to 256 as llama.cpp does), "n_ubatch": int,
             "kv_type": "f16" | "q8_0", "margin_bytes": int (per GPU), "no_disk": bool,
             "vram_source": "flag" | "nvml" | "nvidia-smi" | "rocm-smi" | "none", "ram_source": "flag" | "available"},
  "tiers": [{"name": "gpu0".. | "ram" | "disk", "kind": "gpu" | "ram" | "disk", "device": str,
             "budget_bytes": int | null (disk: no budget), "used_bytes": int,
             "weights_bytes": int, "kv_bytes": int, "compute_bytes": int, "margin_bytes": int,
             "bandwidth_gbs": float}],
  "classes": [{"tier": str, "class": str, "count": int, "bytes": int}],
      classes: token_embd, output_head, attention, norm, router, shared_expert, hyper_connection,
               routed_experts, engram, mtp (skipped: llama.cpp does not load it)
  "tensors": {tensor name: tier name | "skipped"},
  "kv": {"n_ctx", "raw_cells", "csa_cells", "hca_cells", "raw_bytes", "csa_bytes", "hca_bytes",
         "indexer_bytes", "state_bytes", "total_bytes"},
  "compute_bytes": {"gpu": int (each GPU), "host": int},
  "estimates": {"decode_tok_s": float, "decode_bottleneck": tier, "decode_bytes_per_token": {tier: int},
                "decode_seconds_per_token": {tier: float}, "prefill_tok_s": float, "prefill_bottleneck": str,
                "prefill_seconds_per_chunk": {tier | "pcie" | "compute" | "overhead": float}},
  "warnings": [str], "verdict": str,
  "llama": {"n_gpu_layers": int, "override_tensor": [{"pattern": regex, "buffer": "CPU"}], "n_ctx": int,
            "n_batch": int, "n_ubatch": int, "use_mmap": bool, "use_mlock": bool, "swa_full": false,
            "type_k": str, "type_v": str, "flash_attn": bool, "n_threads": int, "tensor_split": [float] | null},
  "llama_args": [str] (llama-server flags)
}"""

EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.")
LAYER_RE = re.compile(r"^blk\.(\d+)\.")
CLASS_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("mtp", re.compile(r"\.nextn\.")),
    ("token_embd", re.compile(r"^token_embd\.")),
    ("output_head", re.compile(r"^output")),
    ("routed_experts", EXPERT_RE),
    ("engram", re.compile(r"\.engram_embd\.")),
    ("shared_expert", re.compile(r"_shexp\.")),
    ("router", re.compile(r"\.(ffn_gate_inp|exp_probs_b\w*|ffn_gate_tid2eid)\.")),
    ("hyper_connection", re.compile(r"\.hc_")),
    ("norm", re.compile(r"norm\.weight$")),
)

# GGUF key suffix -> config.json name, so a GGUF and a config feed the same ModelDims.
GGUF_FACTS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "attention.indexer.head_count": "index_n_heads",
    "attention.indexer.key_length": "index_head_dim",
    "attention.indexer.top_k": "index_topk",
    "attention.compress_ratios": "compress_ratios",
    "attention.kv_source_layer_ids": "kv_source_layer_ids",
    "attention.index_source_layer_ids": "index_source_layer_ids",
    "engram.head_count": "engram_n_heads",
    "engram.max_ngram_size": "engram_max_ngram_size",
    "hyper_connection.count": "hc_mult",
    "expert_count": "n_routed_experts",
    "expert_used_count": "num_experts_per_tok",
    "nextn_predict_layers": "num_nextn_predict_layers",
}


@dataclass(frozen=True)
class PlanInputs:
    """Budgets and options; None means detect (VRAM) or use what is available (RAM) or the default bandwidth."""

    vram_gib: tuple[float, ...] | None = None
    ram_gib: float | None = None
    no_disk: bool = False
    ctx: int | None = None  # None: DEFAULT_CTX capped at the model's context length
    ubatch: int = DEFAULT_UBATCH
    kv_type: str = "f16"
    margin_gib: float = DEFAULT_MARGIN_GIB
    experts: str = "mxfp4"
    dense: str = "q8_0"
    ram_bw: float | None = None
    vram_bw: float | None = None
    disk_bw: float | None = None
    pcie_bw: float | None = None
    measure: bool = False
    threads: int | None = None  # None: physical cores


@dataclass(frozen=True)
class ModelSource:
    """The tensor list to place and the facts it came with."""

    kind: str  # "gguf" or "estimate"
    name: str
    dims: ModelDims
    tensors: tuple[Any, ...]  # quant.mapping.TensorSpec
    files: tuple[Path, ...] = ()
    recipe: dict[str, str] | None = None
    facts: dict[str, Any] = field(default_factory=dict, compare=False)
    target: Path | None = None  # where `dsv4 quantize` would write the estimated GGUF


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

    def tier(self, name: str) -> Tier:
        return next(t for t in self.tiers if t.name == name)

    def class_rows(self) -> list[dict[str, Any]]:
        """(tier, class) -> count, bytes, in tier order."""
        rows: dict[tuple[str, str], list[int]] = {}
        for spec in self.source.tensors:
            key = (self.placement[spec.name], tensor_class(spec.name))
            acc = rows.setdefault(key, [0, 0])
            acc[0] += 1
            acc[1] += spec.nbytes
        order = {t.name: i for i, t in enumerate(self.tiers)} | {"skipped": len(self.tiers)}
        return [
            {"tier": tier, "class": cls, "count": n, "bytes": b}
            for (tier, cls), (n, b) in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))
        ]

    def llama(self) -> dict[str, Any]:
        """Parameters for llama-cpp-python (`dsv4 chat --plan`), keys as in the team contract."""
        gpu = self.n_gpu_layers > 0
        patterns = []
        if gpu and self.cpu_expert_layers:
            layers = "|".join(str(i) for i in self.cpu_expert_layers)
            patterns.append({"pattern": rf"^blk\.({layers})\.ffn_(gate|up|down)_exps\.", "buffer": "CPU"})
        engram = any(tensor_class(s.name) == "engram" for s in self.source.tensors)
        if gpu and engram:
            patterns.append({"pattern": r"\.engram_embd\.", "buffer": "CPU"})
        # Layer counts per GPU: llama.cpp normalizes them and gives GPU i the next share of the offloaded
        # layers, so whole counts reproduce this plan's blocks exactly (rounded fractions can shift a boundary).
        split = [float(n) for n in self.gpu_layer_counts] if len(self.gpu_layer_counts) > 1 else None
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "override_tensor": patterns,
            "n_ctx": self.kv.n_ctx,
            "n_batch": self.inputs.ubatch,
            "n_ubatch": self.inputs.ubatch,
            # mmap when anything is read from disk, and always for Engram tables (sparse lookups); else load it all
            "use_mmap": any(t.kind == "disk" and t.weights for t in self.tiers) or engram,
            "use_mlock": False,
            "swa_full": False,
            "type_k": self.inputs.kv_type,
            "type_v": self.inputs.kv_type,
            "flash_attn": flash_attn(self.inputs, gpu=gpu),
            "n_threads": self.inputs.threads,
            "tensor_split": split,
        }

    def llama_args(self) -> list[str]:
        """The equivalent llama-server command line (without the binary)."""
        p = self.llama()
        model = self.source.files[0] if self.source.files else self.source.target
        args = ["-m", str(model) if model else f"<{self.source.name}.gguf>"]
        args += ["-ngl", str(p["n_gpu_layers"]), "-c", str(p["n_ctx"]), "-b", str(p["n_batch"])]
        args += ["-ub", str(p["n_ubatch"]), "-ctk", p["type_k"], "-ctv", p["type_v"], "-t", str(p["n_threads"])]
        args += ["-fa", "on" if p["flash_attn"] else "off"]
        for o in p["override_tensor"]:
            args += ["-ot", f"{o['pattern']}={o['buffer']}"]
        if p["tensor_split"]:
            args += ["-ts", ",".join(f"{x:g}" for x in p["tensor_split"])]
        if not p["use_mmap"]:
            args.append("--no-mmap")
        if not llama_lib.use_extra_bufts():  # what dsv4 chat does here (AMX CPUs, DSV4_REPACK=off)
            args.append("--no-repack")
        return args

    def to_dict(self) -> dict[str, Any]:
        src = self.source
        return {
            "schema": "dsv4.plan/1",
            "source": {
                "kind": src.kind,
                "name": src.name,
                "arch": src.dims.arch,
                "files": [str(f) for f in src.files],
                "recipe": src.recipe,
                "file_bytes": sum(s.nbytes for s in src.tensors),
            },
            "inputs": {
                "ctx": self.inputs.ctx,
                "n_ctx": self.kv.n_ctx,
                "n_ubatch": self.inputs.ubatch,
                "kv_type": self.inputs.kv_type,
                "margin_bytes": int(self.inputs.margin_gib * GIB),
                "no_disk": self.inputs.no_disk,
                "vram_source": self.vram_source,
                "ram_source": self.ram_source,
            },
            "tiers": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "device": t.device,
                    "budget_bytes": t.budget,
                    "used_bytes": t.used,
                    "weights_bytes": t.weights,
                    "kv_bytes": t.kv,
                    "compute_bytes": t.compute,
                    "margin_bytes": t.margin,
                    "bandwidth_gbs": t.bandwidth_gbs,
                }
                for t in self.tiers
            ],
            "classes": self.class_rows(),
            "tensors": dict(self.placement),
            "kv": {
                "n_ctx": self.kv.n_ctx,
                "raw_cells": self.kv.raw_cells,
                "csa_cells": self.kv.csa_cells,
                "hca_cells": self.kv.hca_cells,
                "raw_bytes": self.kv.raw_bytes,
                "csa_bytes": self.kv.csa_bytes,
                "hca_bytes": self.kv.hca_bytes,
                "indexer_bytes": self.kv.indexer_bytes,
                "state_bytes": self.kv.state_bytes,
                "total_bytes": self.kv.total,
            },
            "compute_bytes": {"gpu": self.compute_gpu, "host": self.compute_host},
            "estimates": self.estimates,
            "warnings": self.warnings,
            "verdict": self.verdict,
            "llama": self.llama(),
            "llama_args": self.llama_args(),
        }


def tensor_class(name: str) -> str:
    for cls, pattern in CLASS_RULES:
        if pattern.search(name):
            return cls
    return "attention"


def layer_of(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def flash_attn(inputs: PlanInputs, *, gpu: bool) -> bool:
    """On for GPUs (smaller compute buffer) and for a quantized cache; llama-cpp-python's CPU default otherwise."""
    return gpu or inputs.kv_type != "f16"


# ---- sources ------------------------------------------------------------------------------------------------


def split_shards(path: Path) -> list[Path]:
    """All shards of a split GGUF given its first shard (`name-00001-of-00003.gguf`); else just `path`."""
    m = re.match(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", path.name)
    if not m:
        return [path]
    if int(m.group(2)) != 1:
        raise UsageError(f"{path}: not the first shard of a split GGUF", hint=f"pass {m.group(1)}-00001-of-*.gguf")
    shards = [path.with_name(f"{m.group(1)}-{i:05d}-of-{m.group(3)}.gguf") for i in range(1, int(m.group(3)) + 1)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise PlanError(f"{path}: split GGUF is missing {missing[0]}", hint="download every shard first")
    return shards


def read_gguf(path: Path) -> ModelSource:
    """Exact tensor bytes from the headers of every shard (the data is never read)."""
    import gguf

    from quant.mapping import TensorSpec

    tensors: list[TensorSpec] = []
    fields: dict[str, Any] = {}
    files = split_shards(path)
    for shard in files:
        try:
            reader = gguf.GGUFReader(shard)
        except (ValueError, OSError, IndexError) as e:
            raise PlanError(f"{shard}: not a GGUF file ({e})", hint="pass a .gguf written by `dsv4 quantize`") from e
        for key, f in reader.fields.items():
            if not key.startswith("tokenizer."):
                fields.setdefault(key, f.contents())
        for t in reader.tensors:
            tensors.append(TensorSpec(t.name, tuple(int(n) for n in t.shape), int(t.tensor_type), int(t.n_bytes)))
    arch = fields.get("general.architecture")
    if arch not in ARCHES:
        raise PlanError(
            f"{path}: architecture {arch!r} is not DeepSeek V4",
            hint="dsv4 plans deepseek4 and deepseek41 GGUFs",
        )
    prefix = f"{arch}."
    facts = {cfg: fields[prefix + key] for key, cfg in GGUF_FACTS.items() if prefix + key in fields}
    names = {t.name for t in tensors}
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "compress_ratios") if k not in facts]
    if missing or embd is None:
        raise PlanError(f"{path}: incomplete deepseek4 GGUF (missing {missing or ['token_embd.weight']})")
    nextn = int(facts.get("num_nextn_predict_layers") or 0)
    if nextn and f"blk.{facts['num_hidden_layers'] - nextn}.nextn.eh_proj.weight" in names:
        facts["num_hidden_layers"] -= nextn
    facts["vocab_size"] = embd.ne[1]
    facts.setdefault("num_attention_heads", 1)
    facts.setdefault("max_position_embeddings", 1 << 20)
    dims = ModelDims.from_facts(facts, arch=arch)
    return ModelSource("gguf", path.name, dims, tuple(tensors), files=tuple(files), facts=facts)


def estimate_from_config(config: dict[str, Any], *, name: str, experts: str, dense: str) -> ModelSource:
    """The tensor list `dsv4 quantize` would write for this config.json, with the chosen recipe."""
    from quant.errors import QuantError
    from quant.mapping import DENSE_RECIPES, EXPERT_RECIPES, facts_of, gguf_tensor_specs

    if experts not in EXPERT_RECIPES:
        raise UsageError(f"--experts {experts!r}: choose one of {', '.join(EXPERT_RECIPES)}")
    if dense not in DENSE_RECIPES:
        raise UsageError(f"--dense {dense!r}: choose one of {', '.join(DENSE_RECIPES)}")
    try:
        facts = facts_of(config)
        tensors = gguf_tensor_specs(config, experts=experts, dense=dense)
    except QuantError as e:
        raise PlanError(f"{name}: {e}", hint=getattr(e, "hint", None)) from e
    dims = ModelDims.from_facts(facts, arch=facts["arch"])
    recipe = {"experts": experts, "dense": dense}
    return ModelSource("estimate", name, dims, tuple(tensors), recipe=recipe, facts=facts)


def load_source(source: str, inputs: PlanInputs) -> ModelSource:
    """A GGUF path, a checkpoint folder (config.json) or a registry name."""
    path = Path(source).expanduser()
    if path.is_file():
        return read_gguf(path)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise PlanError(f"{path}: no config.json here", hint="pass a checkpoint folder, a .gguf or a model name")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PlanError(f"{config_path}: not valid JSON ({e})") from e
        return estimate_from_config(config, name=path.name, experts=inputs.experts, dense=inputs.dense)
    if path.suffix == ".gguf" or source.startswith((".", "/", "~")):
        raise PlanError(f"{source}: no such file", hint="check the path")
    spec = get_model(source)
    if spec.repo and not spec.config and not spec.builtin:
        raise PlanError(f"{source}: no architecture facts for this Hub repo", hint="pull it and plan the folder")
    quantized = default_gguf_path(spec, inputs.experts, inputs.dense)
    if quantized.is_file():
        return read_gguf(quantized)
    estimate = estimate_from_config(spec.hf_config(), name=spec.name, experts=inputs.experts, dense=inputs.dense)
    return dataclasses.replace(estimate, target=quantized)


# ---- placement ----------------------------------------------------------------------------------------------


def _check_inputs(inputs: PlanInputs, dims: ModelDims) -> None:
    if inputs.vram_gib is not None and any(v <= 0 for v in inputs.vram_gib):
        raise UsageError("--vram: every GPU budget must be positive GiB", hint="e.g. --vram 24 or --vram 24,24")
    for flag, value in (("--ram", inputs.ram_gib), ("--ram-bw", inputs.ram_bw), ("--vram-bw", inputs.vram_bw),
                        ("--disk-bw", inputs.disk_bw), ("--pcie-bw", inputs.pcie_bw)):  # fmt: skip
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value:g}")
    if inputs.margin_gib < 0:
        raise UsageError(f"--margin must be zero or positive, got {inputs.margin_gib:g}")
    if inputs.ctx <= 0:
        raise UsageError(f"--ctx must be positive, got {inputs.ctx}")
    if inputs.ctx > dims.context_length:
        raise UsageError(f"--ctx {inputs.ctx} is beyond the model's context length {dims.context_length}")
    if inputs.threads is not None and inputs.threads < 1:
        raise UsageError(f"--threads must be positive, got {inputs.threads}")
    if inputs.ubatch < 1:
        raise UsageError(f"--ubatch must be positive, got {inputs.ubatch}")
    if inputs.kv_type not in KV_TYPES:
        raise UsageError(f"--kv-type {inputs.kv_type!r}: choose one of {', '.join(KV_TYPES)}")


@dataclass
class _Layers:
    """Per-layer byte sums that placement moves as units."""

    dense: list[int]
    experts: list[int]
    root_gpu: int  # output head
    host_fixed: int  # token_embd
    engram: list[tuple[str, int]]


def _group(tensors: Sequence[Any], n_layer: int) -> _Layers:
    groups = _Layers([0] * n_layer, [0] * n_layer, 0, 0, [])
    for spec in tensors:
        cls, layer = tensor_class(spec.name), layer_of(spec.name)
        if cls == "mtp":
            continue
        if cls == "token_embd":
            groups.host_fixed += spec.nbytes
        elif cls == "engram":
            groups.engram.append((spec.name, spec.nbytes))
        elif cls == "routed_experts" and layer is not None:
            groups.experts[layer] += spec.nbytes
        elif layer is None:
            groups.root_gpu += spec.nbytes
        else:
            groups.dense[layer] += spec.nbytes
    return groups


def _gpu_tiers(inputs: PlanInputs) -> tuple[list[Tier], str]:
    margin = int(inputs.margin_gib * GIB)
    if inputs.vram_gib is not None:
        names = [f"GPU {i}" for i in range(len(inputs.vram_gib))]
        budgets = [int(v * GIB) for v in inputs.vram_gib]
        source = "flag"
        bws = [inputs.vram_bw or hardware.DEFAULT_GPU_BW] * len(budgets)
    else:
        scan = hardware.detect_gpus()
        names = [g.name for g in scan.gpus]
        budgets = [g.free_bytes for g in scan.gpus]
        source = scan.source
        bws = [inputs.vram_bw or hardware.gpu_bandwidth(g.name) for g in scan.gpus]
    tiers = [
        Tier(f"gpu{i}", "gpu", name, budget, bw, margin=margin)
        for i, (name, budget, bw) in enumerate(zip(names, budgets, bws, strict=True))
    ]
    return tiers, source


def _fit_gpu_layers(
    gpus: list[Tier], groups: _Layers, kv: KvCache, compute: int, n_layer: int
) -> tuple[int, list[list[int]]] | None:
    """Largest -ngl whose layers fit, with per-GPU layer lists (lower layers on lower GPUs).

    As in llama.cpp, index n_layer is the output head and -ngl N offloads indices n_layer + 1 - N .. n_layer:
    the head first, then layers from the top down. With several GPUs the layers are split in contiguous blocks
    in proportion to each GPU's room, so every GPU also keeps room for its own layers' experts; where that does
    not fit, lower GPUs are filled first.
    """
    room = [g.free - compute for g in gpus]
    for ngl in range(n_layer + 1, 0, -1):
        layers = list(range(n_layer + 1 - ngl, n_layer + 1))
        need = [groups.root_gpu if i == n_layer else groups.dense[i] + kv.per_layer[i] for i in layers]
        for proportional in (True, False):
            assigned = _assign_layers(layers, need, room, proportional=proportional)
            if assigned is not None:
                return ngl, assigned
    return None


def _assign_layers(
    layers: list[int], need: list[int], room: list[int], *, proportional: bool
) -> list[list[int]] | None:
    """Layers in order onto GPUs in order; None when they do not fit. `proportional` ends each GPU's block at
    its share of the total room (by the layer's midpoint), else only when the GPU is full."""
    capacity = sum(max(r, 0) for r in room)
    total = sum(need)
    ends, acc = [], 0
    for r in room:
        acc += max(r, 0)
        ends.append(total * acc / capacity if proportional and capacity else float("inf"))
    left = list(room)
    assigned: list[list[int]] = [[] for _ in room]
    gi, done = 0, 0
    for layer, nbytes in zip(layers, need, strict=True):
        while gi < len(room) and (nbytes > left[gi] or (gi < len(room) - 1 and done + nbytes / 2 > ends[gi])):
            gi += 1
        if gi == len(room):
            return None
        left[gi] -= nbytes
        done += nbytes
        assigned[gi].append(layer)
    return assigned


def _fill_gpus(
    gpus: list[Tier], layer_tier: dict[int, str], groups: _Layers, kv: KvCache, compute: int, n_layer: int
) -> set[int]:
    """Charge the offloaded layers to their GPUs, then add whole expert layers from the top while they fit
    (on each GPU: a full GPU does not stop the others)."""
    by_name = {g.name: g for g in gpus}
    for name in set(layer_tier.values()):
        by_name[name].compute = compute
    for layer, name in layer_tier.items():
        by_name[name].weights += groups.root_gpu if layer == n_layer else groups.dense[layer]
        by_name[name].kv += kv.per_layer[layer] if layer < n_layer else 0
    gpu_experts: set[int] = set()
    full: set[str] = set()
    for layer in sorted((layer for layer in layer_tier if layer < n_layer), reverse=True):
        tier = by_name[layer_tier[layer]]
        if tier.name in full or groups.experts[layer] > tier.free:
            full.add(tier.name)
            continue
        tier.weights += groups.experts[layer]
        gpu_experts.add(layer)
    return gpu_experts


def _fill_host(ram: Tier, disk: Tier, items: list[tuple[str, int]]) -> dict[str, str]:
    """Routed experts, then Engram tables, into what RAM has left; the rest is memory-mapped from disk."""
    placement = {}
    for name, nbytes in items:
        tier = ram if nbytes <= ram.free else disk
        tier.weights += nbytes
        placement[name] = tier.name
    return placement


def make_plan(source: ModelSource | str, inputs: PlanInputs) -> Plan:
    """Place every tensor and estimate speed; raises PlanError when the model cannot run within the budgets."""
    src = load_source(source, inputs) if isinstance(source, str) else source
    dims = src.dims
    inputs = dataclasses.replace(
        inputs,
        ctx=min(DEFAULT_CTX, dims.context_length) if inputs.ctx is None else inputs.ctx,
        threads=hardware.cpu_threads() if inputs.threads is None else inputs.threads,
    )
    _check_inputs(inputs, dims)
    n_layer = dims.n_layer
    groups = _group(src.tensors, n_layer)
    kv = kv_cache(dims, n_ctx=inputs.ctx, n_ubatch=inputs.ubatch, kv_type=inputs.kv_type)
    warnings: list[str] = []
    if dims.arch == "deepseek41":
        warnings.append(
            "deepseek41 (V4.1) does not load in the bundled llama.cpp; this plan is for a fork with Engram support "
            "and its KV cache is a best guess"
        )

    gpus, vram_source = _gpu_tiers(inputs)
    bandwidths = _bandwidths(inputs)
    ram_budget = int(inputs.ram_gib * GIB) if inputs.ram_gib is not None else hardware.available_ram()
    ram = Tier("ram", "ram", "host RAM", ram_budget, bandwidths["ram"])
    disk = Tier("disk", "disk", "mmap from disk", None, bandwidths["disk"])

    compute_gpu = compute_buffer_bytes(dims, n_ctx=inputs.ctx, n_ubatch=inputs.ubatch, flash_attn=True)
    fitted = _fit_gpu_layers(gpus, groups, kv, compute_gpu, n_layer) if gpus else None
    if gpus and fitted is None:
        warnings.append("no layer fits in VRAM next to the compute buffer; planning CPU-only")
    ngl, gpu_layers = fitted or (0, [[] for _ in gpus])
    if warning := llama_lib.offload_warning(ngl, vram_source):
        warnings.append(warning)
    layer_tier = {layer: gpus[gi].name for gi, layers in enumerate(gpu_layers) for layer in layers}
    used_gpus = [g for g, layers in zip(gpus, gpu_layers, strict=True) if layers]
    gpu_experts = _fill_gpus(gpus, layer_tier, groups, kv, compute_gpu, n_layer)

    host_layers = [i for i in range(n_layer) if i not in layer_tier]
    ram.kv = sum(kv.per_layer[i] for i in host_layers)
    # CPU-only: the calibrated buffer. Beside a GPU, llama.cpp's host buffer holds the residual stream and logits
    # for the host-side ops (an uncalibrated estimate: no GPU on the calibration machine).
    compute_host = (
        compute_buffer_bytes(dims, n_ctx=inputs.ctx, n_ubatch=inputs.ubatch, flash_attn=flash_attn(inputs, gpu=False))
        if not used_gpus
        else inputs.ubatch * dims.hc * dims.hidden * 4 * 2 + inputs.ubatch * dims.vocab * 4
    )
    ram.compute = compute_host
    ram.weights = groups.host_fixed + sum(groups.dense[i] for i in host_layers)
    ram.weights += groups.root_gpu if n_layer not in layer_tier else 0
    if ram.used > ram.budget:
        short = ram.used - ram.budget
        raise PlanError(
            f"does not fit: host RAM needs {_gib(ram.used)} for the embedding, host layers, KV and compute buffer "
            f"but has {_gib(ram.budget)} (short by {_gib(short)})",
            hint="use a shorter --ctx, a smaller recipe (--dense q4_k / --experts q4_0), more --vram, or more RAM",
        )
    host_experts = [
        (s.name, s.nbytes)
        for s in src.tensors
        if tensor_class(s.name) == "routed_experts" and layer_of(s.name) not in gpu_experts
    ]
    placement = _fill_host(ram, disk, [*host_experts, *groups.engram])
    if disk.weights and inputs.no_disk:
        raise PlanError(
            f"does not fit without disk: host RAM is short by {_gib(disk.weights)} "
            f"({_gib(ram.budget)} budget, {_gib(ram.used + disk.weights)} needed)",
            hint="allow memory-mapping from disk (drop --no-disk), use a smaller --experts recipe, or add RAM",
        )
    if disk.weights:
        warnings.append(
            f"{_gib(disk.weights)} of weights do not fit in RAM and will be memory-mapped from disk "
            f"(counted at {bandwidths['disk']:g} GB/s in the estimate)"
        )

    for spec in src.tensors:
        if spec.name in placement:
            continue
        cls, layer = tensor_class(spec.name), layer_of(spec.name)
        if cls == "mtp":
            placement[spec.name] = "skipped"
        elif cls == "token_embd":
            placement[spec.name] = "ram"
        elif cls == "routed_experts":
            placement[spec.name] = layer_tier[layer]
        else:
            placement[spec.name] = layer_tier.get(n_layer if layer is None else layer, "ram")

    tiers = [*gpus, ram, disk]
    plan = Plan(
        source=src,
        inputs=inputs,
        tiers=tiers,
        placement=placement,
        kv=kv,
        compute_gpu=compute_gpu if used_gpus else 0,
        compute_host=compute_host,
        n_gpu_layers=ngl,
        gpu_layer_counts=[len(layers) for layers in gpu_layers] if used_gpus else [],
        cpu_expert_layers=sorted(i for i in layer_tier if i < n_layer and i not in gpu_experts),
        estimates={},
        warnings=warnings,
        verdict="",
        vram_source=vram_source,
        ram_source="flag" if inputs.ram_gib is not None else "available",
    )
    plan.estimates = estimate_speed(plan, bandwidths)
    plan.verdict = _verdict(plan)
    return plan


def _gib(n: float) -> str:
    return human_bytes(n) if n < GIB else f"{n / GIB:.1f} GiB"


def _bandwidths(inputs: PlanInputs) -> dict[str, float]:
    """GB/s per host tier: a flag wins, then a measurement here (--measure), then the hardware default."""
    ram_bw, disk_bw = inputs.ram_bw, inputs.disk_bw
    if inputs.measure:
        folder = dsv4_home()
        folder.mkdir(parents=True, exist_ok=True)
        ram_bw = ram_bw or hardware.measure_ram_bandwidth()
        disk_bw = disk_bw or hardware.measure_disk_bandwidth(folder)
    return {
        "ram": ram_bw or hardware.DEFAULT_RAM_BW,
        "disk": disk_bw or hardware.DEFAULT_DISK_BW,
        "pcie": inputs.pcie_bw or hardware.DEFAULT_PCIE_BW,
    }


# ---- speed --------------------------------------------------------------------------------------------------


def _kv_read_per_token(plan: Plan) -> int:
    """Cache bytes one decode step reads: the window, the indexer keys, top-k CSA rows and all HCA rows."""
    kv, dims = plan.kv, plan.source.dims
    n_csa_layers = sum(1 for r in dims.compress_ratios if r == CSA_RATIO)
    row = kv.csa_bytes // max(1, n_csa_layers * kv.csa_cells) if n_csa_layers else 0
    topk_rows = n_csa_layers * min(dims.index_topk, kv.csa_cells) * row
    return kv.raw_bytes + kv.indexer_bytes + kv.hca_bytes + topk_rows


def estimate_speed(plan: Plan, bandwidths: dict[str, float]) -> dict[str, Any]:
    """Seconds per token (and per prefill chunk) by term; the CPU side is a roofline of its memory and compute."""
    dims, inputs = plan.source.dims, plan.inputs
    share = dims.n_expert_used / dims.n_expert
    touched = 1 - (1 - share) ** inputs.ubatch
    decode: dict[str, float] = {t.name: 0.0 for t in plan.tiers}
    chunk: dict[str, float] = {t.name: 0.0 for t in plan.tiers}
    host_params = active_params = 0.0
    gpu = plan.n_gpu_layers > 0
    for spec in plan.source.tensors:
        tier, cls = plan.placement[spec.name], tensor_class(spec.name)
        if tier == "skipped":
            continue
        if cls == "engram":
            rows = _engram_rows_per_token(plan.source.facts)
            row_bytes = spec.nbytes // spec.ne[-1]
            read = rows * (max(row_bytes, PAGE) if tier == "disk" else row_bytes)
            decode[tier] += read
            chunk[tier] += read * inputs.ubatch
            continue
        if cls == "token_embd":
            decode[tier] += spec.nbytes // spec.ne[-1]
            continue
        fraction = share if cls == "routed_experts" else 1.0
        params = math.prod(spec.ne) * fraction
        decode[tier] += spec.nbytes * fraction
        active_params += params
        host_params += params if tier in ("ram", "disk") else 0.0
        read_once = spec.nbytes * (touched if cls == "routed_experts" else 1.0)
        chunk[tier] += read_once
        if gpu and tier in ("ram", "disk"):
            chunk["pcie"] = chunk.get("pcie", 0.0) + read_once
    first_kv = next((t.name for t in plan.tiers if t.kv), "ram")
    decode[first_kv] += _kv_read_per_token(plan)

    gpu_layers = min(plan.n_gpu_layers, dims.n_layer)
    attention = attention_flops(dims, plan.kv, flash_attn=flash_attn(inputs, gpu=gpu))
    host_attention = sum(attention[: dims.n_layer - gpu_layers])

    bw = {t.name: t.bandwidth_gbs * 1e9 for t in plan.tiers} | {"pcie": bandwidths["pcie"] * 1e9}
    decode_s = {name: nbytes / bw[name] for name, nbytes in decode.items() if nbytes}
    cpu_flops = CPU_GFLOPS_PER_CORE * 1e9 * inputs.threads
    decode_s["cpu_compute"] = (2 * host_params + host_attention) / cpu_flops
    if gpu_layers:
        decode_s["gpu_compute"] = (sum(attention) - host_attention) / (GPU_TFLOPS * 1e12)
    decode_s["overhead"] = NODES_PER_LAYER * (
        gpu_layers * GPU_NODE_SECONDS + (dims.n_layer - gpu_layers) * CPU_NODE_SECONDS
    )
    host_memory = decode_s.get("ram", 0.0) + decode_s.get("disk", 0.0)
    total = sum(v for k, v in decode_s.items() if k not in ("ram", "disk", "cpu_compute"))
    total += max(host_memory, decode_s["cpu_compute"])

    chunk_s = {name: nbytes / bw[name] for name, nbytes in chunk.items() if nbytes}
    chunk_s["compute"] = 2 * active_params * inputs.ubatch / (GPU_TFLOPS * 1e12 if gpu else cpu_flops)
    chunk_s["overhead"] = decode_s["overhead"]
    return {
        "decode_tok_s": round(1 / total, 3),
        "decode_bottleneck": max(decode_s, key=decode_s.__getitem__),
        "decode_bytes_per_token": {k: int(v) for k, v in decode.items() if v},
        "decode_seconds_per_token": {k: round(v, 6) for k, v in decode_s.items()},
        "prefill_tok_s": round(inputs.ubatch / sum(chunk_s.values()), 2),
        "prefill_bottleneck": max(chunk_s, key=chunk_s.__getitem__),
        "prefill_seconds_per_chunk": {k: round(v, 4) for k, v in chunk_s.items()},
    }


def _engram_rows_per_token(facts: dict[str, Any]) -> int:
    """Rows one Engram layer reads per token: one per head for each n-gram order 2..max (checkpoints.md §8.4)."""
    return (int(facts.get("engram_max_ngram_size", 4)) - 1) * int(facts.get("engram_n_heads", 8))


def _verdict(plan: Plan) -> str:
    est = plan.estimates
    n_gpus = sum(1 for n in plan.gpu_layer_counts if n)
    where = f"{plan.n_gpu_layers}/{plan.source.dims.n_layer + 1} layers on {n_gpus} GPU(s)" if n_gpus else "CPU only"

    disk = plan.tier("disk").weights
    spill = f", {_gib(disk)} mmap'd from disk" if disk else ""
    return (
        f"fits: {where}, {_gib(plan.tier('ram').used)} host RAM{spill}; "
        f"~{est['decode_tok_s']:.1f} tok/s decode (bound by {est['decode_bottleneck']}), "
        f"~{est['prefill_tok_s']:.0f} tok/s prefill"
    )


def save_plan(plan: Plan, path: Path) -> None:
    """Write the JSON plan atomically (temp name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan.to_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_plan(path: Path) -> dict[str, Any]:
    """A plan written by `dsv4 plan -o`, for `dsv4 chat --plan`; checks the schema and the llama section."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlanError(f"{path}: cannot read plan ({e})", hint="write one with `dsv4 plan MODEL -o plan.json`") from e
    if not isinstance(data, dict) or data.get("schema") != "dsv4.plan/1" or not isinstance(data.get("llama"), dict):
        raise PlanError(f"{path}: not a dsv4 plan", hint="write one with `dsv4 plan MODEL -o plan.json`")
    return data
