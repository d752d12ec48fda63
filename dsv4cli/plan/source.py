"""What a plan places: the tensor list of a GGUF (exact, from its header) or of the GGUF `dsv4 quantize` would
write for a checkpoint or registry model (estimated from config.json with the chosen recipe, nothing downloaded).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4cli.engine.kvcache import ModelDims
from dsv4cli.errors import PlanError, UsageError
from dsv4cli.gguf_io.read import read_header
from dsv4cli.load.resolve import find_local_gguf, is_prequantized
from dsv4cli.models.local import default_gguf_path
from dsv4cli.models.ref import ModelRef, resolve_model
from dsv4cli.plan.source_facts import ModelSource, source_from_header
from quant.files import load_json_object

if TYPE_CHECKING:
    from dsv4cli.plan.inputs import PlanInputs


def read_gguf(path: Path) -> ModelSource:
    """Exact tensor bytes, architecture facts and the recorded recipe from the headers of every shard."""
    return source_from_header(read_header(path), path.name)


def estimate_from_config(
    config: dict[str, Any], *, name: str, experts: str, dense: str, mix: dict[str, str] | None = None
) -> ModelSource:
    """The tensor list `dsv4 quantize` would write for this config.json, with the chosen recipe (and fitted mix)."""
    from quant.errors import QuantError
    from quant.mapping import facts_of, gguf_tensor_specs
    from quant.recipes import check_recipe

    try:
        check_recipe(experts, dense)
    except QuantError as e:
        raise UsageError(str(e)) from e
    try:
        facts = facts_of(config)
        tensors = gguf_tensor_specs(config, experts=experts, dense=dense, mix=mix)
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
    if is_prequantized(ref):  # a pre-quantized GGUF: local, or its headers
        from dsv4cli.plan.remote import remote_source

        local = find_local_gguf(ref)
        return read_gguf(local) if local else remote_source(spec, ref.tag, file=ref.file)
    quantized = find_local_gguf(ref, (inputs.experts, inputs.dense))
    if quantized:
        return read_gguf(quantized)
    estimate = estimate_from_config(spec.hf_config(), name=spec.name, experts=inputs.experts, dense=inputs.dense)
    return dataclasses.replace(estimate, target=default_gguf_path(spec, f"{inputs.experts}-{inputs.dense}"))
