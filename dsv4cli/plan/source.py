"""What a plan places: the tensor list of a GGUF (exact, from its header) or of the GGUF `dsv4 quantize` would
write for a checkpoint or registry model (estimated from config.json with the chosen recipe, nothing downloaded).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4cli.engine.kvcache import ModelDims
from dsv4cli.errors import PlanError, UsageError
from dsv4cli.gguf_io.read import SOURCE_KEY, GgufHeader, check_facts, read_header
from dsv4cli.models.local import default_gguf_path, find_gguf
from dsv4cli.models.ref import ModelRef, resolve_model
from quant.arch import ARCHES
from quant.files import load_json_object

if TYPE_CHECKING:
    from dsv4cli.plan.model import PlanInputs

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
REQUIRED_FACTS = ("hidden_size", "num_hidden_layers", "compress_ratios", "head_dim", "index_n_heads", "index_head_dim",
                  "index_topk", "sliding_window", "n_routed_experts", "num_experts_per_tok")  # fmt: skip


@dataclass(frozen=True)
class ModelSource:
    """The tensor list to place and the facts it came with."""

    kind: str  # "gguf" or "estimate"
    name: str
    dims: ModelDims
    tensors: tuple[Any, ...]  # quant.mapping.TensorSpec
    files: tuple[Path, ...] = ()
    recipe: dict[str, str] | None = None
    checkpoint: str | None = None  # the checkpoint folder a GGUF was converted from, as its header records it
    facts: dict[str, Any] = field(default_factory=dict, compare=False)
    target: Path | None = None  # where `dsv4 quantize` would write the estimated GGUF
    fetched_bytes: int | None = None  # "remote": header bytes read over HTTP
    download_bytes: int | None = None  # "remote": size of the files a pull would download


def read_gguf(path: Path) -> ModelSource:
    """Exact tensor bytes, architecture facts and the recorded recipe from the headers of every shard."""
    return source_from_header(read_header(path), path.name)


def source_from_header(header: GgufHeader, name: str) -> ModelSource:
    """A GGUF's tensors and architecture facts, wherever its header was read from (a file, the Hub)."""
    fields, tensors = header.fields, header.tensors
    path = header.files[0]
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
    missing = [k for k in REQUIRED_FACTS if k not in facts]
    if missing or embd is None:
        raise PlanError(f"{path}: incomplete deepseek4 GGUF (missing {missing or ['token_embd.weight']})")
    facts["vocab_size"] = embd.ne[1] if len(embd.ne) == 2 else None
    check_facts(facts, {cfg: prefix + key for key, cfg in GGUF_FACTS.items()} | {"vocab_size": embd.name}, path)
    nextn = int(facts.get("num_nextn_predict_layers") or 0)
    if (
        0 < nextn < facts["num_hidden_layers"]
        and f"blk.{facts['num_hidden_layers'] - nextn}.nextn.eh_proj.weight" in names
    ):
        facts["num_hidden_layers"] -= nextn
    facts.setdefault("num_attention_heads", 1)
    facts.setdefault("max_position_embeddings", 1 << 20)
    dims = ModelDims.from_facts(facts, arch=arch)
    checkpoint = fields.get(SOURCE_KEY)
    return ModelSource(
        "gguf",
        name,
        dims,
        tensors,
        files=header.files,
        recipe=header.recipe,
        checkpoint=checkpoint if isinstance(checkpoint, str) else None,
        facts=facts,
    )


def estimate_from_config(config: dict[str, Any], *, name: str, experts: str, dense: str) -> ModelSource:
    """The tensor list `dsv4 quantize` would write for this config.json, with the chosen recipe."""
    from quant.errors import QuantError
    from quant.mapping import facts_of, gguf_tensor_specs
    from quant.recipes import check_recipe

    try:
        check_recipe(experts, dense)
    except QuantError as e:
        raise UsageError(str(e)) from e
    try:
        facts = facts_of(config)
        tensors = gguf_tensor_specs(config, experts=experts, dense=dense)
    except QuantError as e:
        raise PlanError(f"{name}: {e}", hint=getattr(e, "hint", None)) from e
    dims = ModelDims.from_facts(facts, arch=facts["arch"])
    recipe = {"experts": experts, "dense": dense}
    return ModelSource("estimate", name, dims, tuple(tensors), recipe=recipe, facts=facts)


def load_source(ref: ModelRef | str, inputs: PlanInputs) -> ModelSource:
    """The tensors of MODEL: a GGUF, a checkpoint folder (config.json), or a registry model (its quantized GGUF
    with the requested recipe when one is local, else an estimate from its registry facts).
    """
    ref = resolve_model(ref) if isinstance(ref, str) else ref
    if ref.kind == "gguf":
        if not ref.path.is_file():
            raise PlanError(f"{ref.text}: no such file", hint="check the path")
        return read_gguf(ref.path)
    if ref.kind == "checkpoint":
        config_path = ref.path / "config.json"
        if not config_path.is_file():
            raise PlanError(
                f"{ref.path}: no config.json here", hint="pass a checkpoint folder, a .gguf or a model name"
            )
        config = load_json_object(config_path)  # size-capped; an array or deep nesting is one line
        return estimate_from_config(config, name=ref.path.name, experts=inputs.experts, dense=inputs.dense)
    spec = ref.spec
    if ref.tag or (spec.repo and not spec.config and not spec.builtin):  # a pre-quantized GGUF: local, or its headers
        from dsv4cli.hub.gguf_repo import find_local
        from dsv4cli.plan.remote import remote_source

        local = find_local(spec, ref.tag)
        return read_gguf(local) if local else remote_source(spec, ref.tag)
    quantized = find_gguf(spec, experts=inputs.experts, dense=inputs.dense)
    if quantized:
        return read_gguf(quantized)
    estimate = estimate_from_config(spec.hf_config(), name=spec.name, experts=inputs.experts, dense=inputs.dense)
    return dataclasses.replace(estimate, target=default_gguf_path(spec, inputs.experts, inputs.dense))
