"""Settings for a plan: each from its flag, else from `dsv4 tune`'s cached result for this model, machine, build
and devices, else the default rule; the plan's assumptions table names which (`flag`, `tuned`, `default: ...`).
"""

from __future__ import annotations

import dataclasses
import os

from dsv4cli.engine.kvcache import DEFAULT_KV_TYPE
from dsv4cli.errors import Dsv4Error
from dsv4cli.home import dsv4_home
from dsv4cli.plan.inputs import DEFAULT_UBATCH, PlanInputs
from dsv4cli.plan.model import Tier
from dsv4cli.plan.source import ModelSource
from dsv4cli.system import hardware, llama_lib
from dsv4cli.tune import cache
from dsv4cli.tune.settings import Settings

DEFAULTS = {
    "threads": "default: physical cores",
    "ubatch": "default",
    "kv_type": "default",
    "flash_attn": "default: on (measured faster on CPUs too)",
    "repack": "default: on unless the CPU has AMX",
    "mmap": "default: only when streaming from disk",
    "gpu_expert_layers": "default: as many as fit",
}


def devices_signature(gpus: list[Tier], inputs: PlanInputs) -> str:
    """The devices a tuned result belongs to: `cpu`, or the GPUs' names and the RPC workers."""
    names = [f"gpu:{g.device}" for g in gpus] + [f"rpc:{e}" for e in inputs.rpc]
    return ",".join(names) or "cpu"


def tune_key(src: ModelSource, gpus: list[Tier], inputs: PlanInputs) -> dict[str, str] | None:
    """The cache key for this plan's model and devices; None where none can be made (no llama.cpp to ask)."""
    from dsv4cli.plan.schema import tensor_table_digest

    try:
        return cache.key_parts(tensor_table_digest(src.tensors, src.dims.n_layer), devices_signature(gpus, inputs))
    except (Dsv4Error, ImportError, OSError):
        return None


def apply_tuned(src: ModelSource, inputs: PlanInputs, gpus: list[Tier]) -> tuple[PlanInputs, dict[str, str], list[str]]:
    """`inputs` with every setting not given by a flag taken from the tuned result (if any) or the default rule,
    the source of each, and notes (an unreadable tune file)."""
    given = {
        "threads": inputs.threads,
        "ubatch": inputs.ubatch,
        "kv_type": inputs.kv_type,
        "flash_attn": inputs.flash_attn,
        "repack": inputs.repack if os.environ.get(llama_lib.REPACK_ENV, "auto") == "auto" else "env",
        "mmap": inputs.mmap,
        "gpu_expert_layers": inputs.gpu_expert_layers,
    }
    tuned: Settings | None = None
    notes: list[str] = []
    key = None if inputs.untuned else tune_key(src, gpus, inputs)
    if key is not None:
        tuned, note = cache.load(dsv4_home(), key)
        notes += [note] if note else []
    sources, values = {}, {}
    for name, value in given.items():
        if value is not None:
            sources[name] = "flag" if value != "env" else f"${llama_lib.REPACK_ENV}"
        elif tuned is not None and getattr(tuned, name) is not None:
            sources[name], values[name] = "tuned", getattr(tuned, name)
        else:
            sources[name] = DEFAULTS[name]
    defaults = {
        "threads": hardware.cpu_threads(),
        "ubatch": DEFAULT_UBATCH,
        "kv_type": DEFAULT_KV_TYPE,
        "flash_attn": True,
        "repack": llama_lib.use_extra_bufts(),
        "mmap": False,
    }
    filled = {name: values.get(name, default) for name, default in defaults.items() if given[name] is None}
    if "gpu_expert_layers" in values:
        filled["gpu_expert_layers"] = values["gpu_expert_layers"]
    return dataclasses.replace(inputs, **filled), sources, notes
