"""A GGUF header's architecture facts under their config.json names, so a GGUF (local, or its header read over
HTTP) and a config.json feed the same `ModelDims` and the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4cli.engine.kvcache import ModelDims
from dsv4cli.errors import PlanError
from dsv4cli.gguf_io.read import GgufHeader, check_facts
from quant.archs import ARCHS
from quant.gguf_keys import ARCHITECTURE, SOURCE_KEY, facts_keys

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


def source_from_header(header: GgufHeader, name: str) -> ModelSource:
    """A GGUF's tensors and architecture facts, wherever its header was read from (a file, the Hub)."""
    fields, tensors = header.fields, header.tensors
    path = header.files[0]
    arch = fields.get(ARCHITECTURE)
    if not isinstance(arch, str) or arch not in ARCHS:  # a damaged header may hold any value
        raise PlanError(
            f"{path}: architecture {arch!r} is not DeepSeek V4",
            hint=f"dsv4 plans {' and '.join(ARCHS)} GGUFs",
        )
    # The keys the GGUF was written with (`quant.gguf_keys`), read back under their config.json names.
    keys = {cfg: key.of(arch) for cfg, key in facts_keys(ARCHS[arch].keys).items()}
    facts = {cfg: fields[key] for cfg, key in keys.items() if key in fields}
    names = {t.name for t in tensors}
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    missing = [k for k in REQUIRED_FACTS if k not in facts]
    if missing or embd is None:
        raise PlanError(f"{path}: incomplete deepseek4 GGUF (missing {missing or ['token_embd.weight']})")
    facts["vocab_size"] = embd.ne[1] if len(embd.ne) == 2 else None
    check_facts(facts, keys | {"vocab_size": embd.name}, path)
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
