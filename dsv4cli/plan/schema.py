"""The plan's JSON form: what `dsv4 plan --json` prints, `-o` writes and `dsv4 chat --plan` reads back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4cli.atomic import write_text_atomic
from dsv4cli.engine.params import LoadParams
from dsv4cli.errors import PlanError
from dsv4cli.units import GIB

if TYPE_CHECKING:
    from dsv4cli.plan.inputs import PlanInputs
    from dsv4cli.plan.model import Plan
    from dsv4cli.plan.source import ModelSource

MAX_PLAN_BYTES = 64 << 20  # a plan lists every tensor: about 200 kB for DeepSeek V4 Pro
WRITE_HINT = "write one with `dsv4 plan MODEL -o plan.json`"
SCHEMA = """\
{
  "schema": "dsv4.plan/1",
  "source": {"kind": "gguf" | "estimate", "name": str, "arch": "deepseek4" | "deepseek41",
             "files": [path, ...] (gguf only), "recipe": {"experts": str, "dense": str} | null (a GGUF: as its
             header records it), "checkpoint": str | null (a GGUF: the folder it was converted from),
             "file_bytes": int (sum of tensor bytes)},
  "inputs": {"ctx": int (requested), "n_ctx": int (padded to 256 as llama.cpp does), "n_ubatch": int,
             "kv_type": "f16" | "q8_0", "margin_bytes": int (per GPU), "no_disk": bool,
             "vram_source": "flag" | "nvml" | "nvidia-smi" | "rocm-smi" | "none", "ram_source": "flag" | "available"},
  "tiers": [{"name": "rpc0".. | "gpu0".. | "ram" | "disk", "kind": "rpc" | "gpu" | "ram" | "disk", "device": str,
             "budget_bytes": int | null (disk: no budget), "used_bytes": int,
             "weights_bytes": int, "kv_bytes": int, "compute_bytes": int, "margin_bytes": int,
             "bandwidth_gbs": float,
             rpc only: "endpoint": "host:port", "rtt_ms": float, "net_gbs": float (measured at plan time)}],
  "classes": [{"tier": str, "class": str, "count": int, "bytes": int}],
      classes: token_embd, output_head, attention, norm, router, shared_expert, hyper_connection,
               routed_experts, engram, mtp (skipped: llama.cpp does not load it)
  "tensors": {tensor name: tier name | "skipped"},
  "kv": {"n_ctx", "raw_cells", "csa_cells", "hca_cells", "raw_bytes", "csa_bytes", "hca_bytes",
         "indexer_bytes", "state_bytes", "total_bytes"},
  "compute_bytes": {"gpu": int (each GPU), "host": int},
  "estimates": {"decode_tok_s": float, "decode_tok_s_full_ctx": float, "decode_bottleneck": tier,
                "decode_bytes_per_token": {tier | "network": int},
                "decode_seconds_per_token": {tier | "network": float}, "prefill_tok_s": float,
                "prefill_bottleneck": str,
                "prefill_seconds_per_chunk": {tier | "pcie" | "compute" | "overhead" | "network": float}},
  "warnings": [str], "verdict": str (starts "fits:" or "streams from disk:"),
  "hints": [str] (what would keep every weight in memory; empty when it fits),
  "reserve_bytes": int (host RAM kept for the OS),
  "assumptions": {name: {"value": number | str | bool, "unit": str,
                         "source": "measured" | "flag" | "default..." | "assumed" | "detected" | ...}}
      names: threads, ram_bw, disk_bw, cpu_dense_gemv, cpu_expert_gemv, cpu_layer_cost, ctx, kv_type,
             flash_attn, ubatch, repack, mmap, ram_reserve; with GPUs also pcie_bw, gpu_node_cost, gpuN_bw,
             gpu_expert_layers (the load settings' source is "flag", "tuned" (`dsv4 tune`) or "default: ..."),
  "model": {"name": str, "files": [file name] (empty for an estimate), "file_bytes": int | null,
            "tensor_bytes": int, "tensor_table_sha256": str (names, types and shapes of every placed tensor)}
      (`dsv4 chat --plan` refuses a GGUF whose tensor table differs: check_plan_model),
  "llama": {"n_gpu_layers": int, "override_tensor": [{"pattern": regex, "buffer": "CPU"}], "n_ctx": int,
            "n_batch": int, "n_ubatch": int, "use_mmap": bool, "use_mlock": bool, "swa_full": false,
            "type_k": str, "type_v": str, "flash_attn": bool, "n_threads": int,
            "tensor_split": [float] (layers per GPU) | null,
            "use_extra_bufts": bool (weight repacking; false: llama-server --no-repack) | null (decided at load),
            "rpc": ["host:port"] (llama-server --rpc; their devices come first in tensor_split)},
  "llama_args": [str] (llama-server flags)
}"""


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON data (SCHEMA)."""
    src = plan.source
    return {
        "schema": "dsv4.plan/1",
        "source": {
            "kind": src.kind,
            "name": src.name,
            "arch": src.dims.arch,
            "files": [str(f) for f in src.files],
            "recipe": src.recipe,
            "checkpoint": src.checkpoint,
            "file_bytes": sum(s.nbytes for s in src.tensors),
            "download_bytes": src.download_bytes,
            "fetched_bytes": src.fetched_bytes,
        },
        "inputs": {
            "ctx": plan.inputs.ctx,
            "n_ctx": plan.kv.n_ctx,
            "n_ubatch": plan.inputs.ubatch,
            "kv_type": plan.inputs.kv_type,
            "margin_bytes": int(plan.inputs.margin_gib * GIB),
            "no_disk": plan.inputs.no_disk,
            "vram_source": plan.vram_source,
            "ram_source": plan.ram_source,
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
                "bandwidth_gbs": round(t.bandwidth_gbs, 1),
                **(
                    {"endpoint": t.endpoint, "rtt_ms": round(t.rtt_s * 1e3, 3), "net_gbs": round(t.net_gbs, 3)}
                    if t.kind == "rpc"
                    else {}
                ),
            }
            for t in plan.tiers
        ],
        "classes": plan.class_rows(),
        "tensors": dict(plan.placement),
        "kv": {
            "n_ctx": plan.kv.n_ctx,
            "raw_cells": plan.kv.raw_cells,
            "csa_cells": plan.kv.csa_cells,
            "hca_cells": plan.kv.hca_cells,
            "raw_bytes": plan.kv.raw_bytes,
            "csa_bytes": plan.kv.csa_bytes,
            "hca_bytes": plan.kv.hca_bytes,
            "indexer_bytes": plan.kv.indexer_bytes,
            "state_bytes": plan.kv.state_bytes,
            "total_bytes": plan.kv.total,
        },
        "compute_bytes": {"gpu": plan.compute_gpu, "host": plan.compute_host},
        "estimates": plan.estimates,
        "warnings": plan.warnings,
        "verdict": plan.verdict,
        "hints": plan.hints,
        "reserve_bytes": plan.reserve,
        "assumptions": plan.assumptions,
        "model": model_binding(plan.source),
        "llama": plan.load_params().to_dict(),
        "llama_args": plan.llama_args(),
    }


def save_plan(plan: Plan, path: Path) -> None:
    """Write the JSON plan atomically (unique temp name, then rename)."""
    try:
        write_text_atomic(path, json.dumps(plan.to_dict(), indent=2) + "\n")
    except OSError as e:
        raise PlanError(f"cannot write the plan to {path}: {e.strerror or e}", hint="choose a writable -o path") from e


def load_plan(path: Path) -> dict[str, Any]:
    """A plan written by `dsv4 plan -o`, for `dsv4 chat --plan`: size-capped, regular file, JSON with the schema tag
    and a llama section (whose values `LoadParams.from_dict` checks)."""
    from quant.errors import QuantError
    from quant.files import load_json

    try:
        data = load_json(Path(path), "plan", limit=MAX_PLAN_BYTES)
    except QuantError as e:
        raise PlanError(str(e), hint=WRITE_HINT) from e
    if not isinstance(data, dict) or data.get("schema") != "dsv4.plan/1" or not isinstance(data.get("llama"), dict):
        raise PlanError(f"{path}: not a dsv4 plan (no schema dsv4.plan/1 and llama section)", hint=WRITE_HINT)
    return data


def plan_budgets(path: Path) -> PlanInputs:
    """The machine a plan file was made for, as plan inputs: each GPU tier's budget, host RAM (its budget plus the
    reserve), the reserve, context, micro-batch, cache type, GPU margin and threads; for fitting a quant to that
    machine (`dsv4 quantize --fit --plan FILE`). Plans with RPC workers are refused: their memory is probed live."""
    from dsv4cli.plan.inputs import PlanInputs

    data = load_plan(path)
    try:
        tiers, inputs, llama = data["tiers"], data["inputs"], data["llama"]
        rpc = any(t["kind"] == "rpc" for t in tiers)
        ram = next(t for t in tiers if t["kind"] == "ram")
        reserve = int(data["reserve_bytes"])
        budgets = PlanInputs(
            vram_gib=tuple(int(t["budget_bytes"]) / GIB for t in tiers if t["kind"] == "gpu"),
            ram_gib=(int(ram["budget_bytes"]) + reserve) / GIB,
            reserve_gib=reserve / GIB,
            no_disk=bool(inputs["no_disk"]),
            ctx=int(inputs["ctx"]),
            ubatch=int(inputs["n_ubatch"]),
            kv_type=str(inputs["kv_type"]),
            margin_gib=int(inputs["margin_bytes"]) / GIB,
            threads=int(llama["n_threads"]),
        )
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise PlanError(f"{path}: damaged plan (tiers, inputs or llama section: {e!r})", hint=WRITE_HINT) from e
    if rpc:
        raise PlanError(f"{path}: a plan with RPC workers cannot be fitted to", hint="pass --vram/--ram instead")
    return budgets


def tensor_table_digest(tensors: Sequence[Any], n_layer: int) -> str:
    """sha256 of the name, type and shape of every tensor a placement covers: equal for a registry estimate and
    the GGUF `dsv4 quantize` writes from it, and for that GGUF with or without its MTP block (never placed)."""
    from dsv4cli.plan.groups import tensor_class

    digest = hashlib.sha256()
    for spec in tensors:
        if tensor_class(spec.name, n_layer) != "mtp":
            digest.update(f"{spec.name}|{spec.ggml_type}|{','.join(map(str, spec.ne))}\n".encode())
    return digest.hexdigest()


def model_binding(src: ModelSource) -> dict[str, Any]:
    """The model a plan was made for (its `model` section)."""
    return {
        "name": src.name,
        "files": [f.name for f in src.files],
        "file_bytes": _file_bytes(src),
        "tensor_bytes": sum(s.nbytes for s in src.tensors),
        "tensor_table_sha256": tensor_table_digest(src.tensors, src.dims.n_layer),
    }


def _file_bytes(src: ModelSource) -> int | None:
    """Size of the model's files: on disk, or announced by the Hub for a plan made before download."""
    if src.download_bytes is not None:
        return src.download_bytes
    return sum(f.stat().st_size for f in src.files) if src.files else None


def check_plan_model(data: dict[str, Any], model: Path | ModelSource, *, plan_path: Path) -> None:
    """Refuse to apply a plan to a GGUF other than the one it was made for (plans without a `model` section
    predate the binding and are applied as before). `model` is the GGUF, or its header already read."""
    from dsv4cli.plan.source import read_gguf

    bound = data.get("model")
    if not isinstance(bound, dict) or not isinstance(bound.get("tensor_table_sha256"), str):
        return
    src = read_gguf(model) if isinstance(model, Path) else model
    gguf = src.files[0]
    if tensor_table_digest(src.tensors, src.dims.n_layer) != bound["tensor_table_sha256"]:
        raise PlanError(
            f"{plan_path}: made for {bound.get('name')!r}, not {gguf.name} (their tensors differ)",
            hint=f"make a plan for this file: dsv4 plan {gguf} -o {plan_path}",
        )


def load_plan_params(
    path: Path, model: ModelSource | None = None, *, note: Callable[[str], None] | None = None
) -> LoadParams:
    """The checked load parameters of a plan file (errors name the file and the key); with `model` (a GGUF's
    header), refused when the plan was made for another model."""
    data = load_plan(path)
    if model is not None:
        check_plan_model(data, model, plan_path=path)
    return LoadParams.from_dict(data["llama"], source=str(path), note=note)
