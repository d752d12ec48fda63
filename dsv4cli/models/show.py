"""`dsv4 show MODEL`: what a model is, from its GGUF header (local, or on the Hub before a download) or from
the tensor list `dsv4 quantize` would write: architecture and dimensions, tensor types and bytes per plan class
(`dsv4cli.plan.groups`), split files, the expert error summary `dsv4 quantize` records, chat template, source.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from dsv4cli.models.ref import ModelRef
from dsv4cli.plan.groups import tensor_class
from quant.gguf_keys import BUDGET_KEY, CHAT_TEMPLATE, FIT_KEYS, IMATRIX_KEY, MIX_KEY, SUMMARY_KEY
from quant.recipes import type_name

DIMS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_routed_experts",
    "num_experts_per_tok",
    "vocab_size",
    "max_position_embeddings",
)


def _header_extras(path: Path, *, ours: bool) -> dict[str, Any]:
    """The chat template's presence, and the expert error summary and fit dsv4 recorded, from a local first shard.
    Not `ours` (another tool wrote it; llama-quantize copies dsv4.* keys from its input): only the template."""
    from quant.gguf_header import read_gguf_header

    wanted = {CHAT_TEMPLATE, SUMMARY_KEY, *FIT_KEYS}
    fields = read_gguf_header(path, keep=wanted.__contains__).fields

    def parsed(key: str) -> Any:
        try:
            return json.loads(str(fields[key]).strip()) if key in fields else None
        except ValueError:
            return None

    fitted = {"budget": parsed(BUDGET_KEY), "mix": parsed(MIX_KEY), "imatrix": parsed(IMATRIX_KEY)}
    return {
        "chat_template": CHAT_TEMPLATE in fields,
        "expert_error_summary": parsed(SUMMARY_KEY) if ours else None,
        "fit": fitted if ours and any(v is not None for v in fitted.values()) else None,
    }


def _pulled_from(path: Path) -> str | None:
    """The Hub repo a pulled file came from (its folder's manifest), None for other files."""
    from dsv4cli.home import models_dir
    from dsv4cli.hub.manifest import read_manifest

    folder = next((p for p in path.parents if p.parent == models_dir()), None)
    return read_manifest(folder).get("repo") if folder else None


def describe(ref: ModelRef) -> dict[str, Any]:
    """Everything `dsv4 show` prints, as JSON data."""
    from dsv4cli.eval.record import read_results
    from dsv4cli.plan import PlanInputs
    from dsv4cli.plan.source import load_source

    src = load_source(ref, PlanInputs())
    classes: dict[str, dict[str, Any]] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "types": defaultdict(int)})
    for t in src.tensors:
        row = classes[tensor_class(t.name, src.dims.n_layer)]
        row["tensors"] += 1
        row["bytes"] += t.nbytes
        row["types"][type_name(t.ggml_type)] += t.nbytes
    local = src.kind == "gguf"
    extras = (
        _header_extras(src.files[0], ours=src.recipe is not None)
        if local
        else {"chat_template": None, "expert_error_summary": None, "fit": None}
    )
    return {
        "name": src.name,
        "kind": src.kind,
        "arch": src.dims.arch,
        "dims": {k: src.facts[k] for k in DIMS if k in src.facts},
        "recipe": src.recipe,
        "bytes": sum(t.nbytes for t in src.tensors),
        "classes": {
            name: {**row, "types": dict(sorted(row["types"].items()))} for name, row in sorted(classes.items())
        },
        "files": [{"path": str(f), "bytes": f.stat().st_size if local else None} for f in src.files],
        **extras,
        "source": src.checkpoint,  # the checkpoint `dsv4 quantize` converted (None for other producers' files)
        "repo": (_pulled_from(src.files[0]) if local else None) or (ref.spec and ref.spec.repo),
        "fetched_bytes": src.fetched_bytes,
        "eval": read_results(src.files[0]) if local else [],  # `dsv4 eval` results, newest first
    }
