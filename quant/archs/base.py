"""What dsv4 knows about one model family, as one value: `Arch` (registered in `quant.archs.ARCHS`).

The tensor layout is data: `Row`s of GGUF name, ggml shape, how the tensor is stored and the checkpoint tensors it
is made from, each with the condition under which a block has it. `quant.mapping` turns the rows into the exact
tensor list of a config; the tiny model writers (`dsv4cli.models.tiny`) stay separate, so the tests check these
rows against something written independently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from quant.gguf_keys import ARCH_KEYS, NEXTN_PREDICT_LAYERS, ROPE_SCALING, Key

HC = 4  # hyper-connection copies; llama.cpp's deepseek4 graph asserts it
# How a row is stored: F32/BF16 as is, DENSE/EXPERTS in the recipe's type, I32 for routing tables, CONCAT: the dense
# type over its sources joined on the input dimension (the MTP block's eh_proj).
F32, BF16, DENSE, EXPERTS, I32, CONCAT = "f32", "bf16", "dense", "experts", "i32", "concat"
Dims = SimpleNamespace  # the short names rows are sized with, see `block_dims`
Shape = Callable[[Dims], tuple[int, ...]]


def _always(_: Dims) -> bool:
    return True


@dataclass(frozen=True)
class Row:
    """One GGUF tensor of the layout: `name` (in a block without `blk.N.`), ggml ne from the dims, how it is
    stored, its checkpoint sources (in a block without `layers.N.`; `{expert}` = one per routed expert), and `when`
    a block has it."""

    name: str
    shape: Shape
    stored: str
    sources: tuple[str, ...]
    when: Callable[[Dims], bool] = _always


@dataclass(frozen=True)
class LookupClass:
    """Tensors a family reads a few rows of per token (lookup tables such as Engram's): their plan class name, the
    pattern of their GGUF names, and the rows one such tensor serves per token from the facts. Placement keeps them
    off GPUs and fills RAM with them last; the speed model charges those rows (`dsv4cli.plan`)."""

    name: str
    pattern: str
    rows_per_token: Callable[[dict[str, Any]], int]


@dataclass(frozen=True)
class Arch:
    """One model family.

    - `name`: GGUF `general.architecture`; `title`: how messages name it; `hf_class`, `model_type`: its config.json
      (`text_config`: the facts are nested there, as V4.1 ships them).
    - `required`: config.json keys the converter needs; `int_bounds`, `layer_lists`: its own integer keys with their
      sane range, its lists of layer ids and `row_counts` (a list with one count per layer of a layer list;
      `quant.config` checks all three); `config_defaults`: registry facts with no
      V4 default (`dsv4cli.models.registry`).
    - `root`, `block`: the tensor layout; `keys`: its own metadata rows after `quant.gguf_keys.ARCH_KEYS`.
    - `plan_classes`: its lookup-table tensor classes for placement and speed (`dsv4cli.plan.groups`).
    - `kv_by_source_layers`: the compressed and indexer caches live on the listed KV-/index-source layers (V4.1)
      instead of following each layer's compress ratio (V4), see `dsv4cli.engine.kvcache`.
    - `runs`: the installed llama.cpp loads it; else `refusal` says why, `refusal_hint` what to do instead, and
      `plan_warning` goes on its plans.
    """

    name: str
    title: str
    hf_class: str
    model_type: str
    required: tuple[str, ...]
    root: tuple[Row, ...]
    block: tuple[Row, ...]
    keys: tuple[Key, ...] = ()
    text_config: bool = False
    config_defaults: dict[str, Any] = field(default_factory=dict)
    int_bounds: dict[str, tuple[int, int]] = field(default_factory=dict)
    layer_lists: tuple[str, ...] = ()
    row_counts: dict[str, str] = field(default_factory=dict)
    plan_classes: tuple[LookupClass, ...] = ()
    kv_by_source_layers: bool = False
    runs: bool = True
    refusal: str = ""
    refusal_hint: str = ""
    plan_warning: str = ""

    @property
    def metadata_keys(self) -> tuple[Key, ...]:
        """Every architecture key a GGUF of this family can have (the shared table, then its own)."""
        return (*ARCH_KEYS, *ROPE_SCALING, NEXTN_PREDICT_LAYERS, *self.keys)


def block_dims(facts: dict[str, Any], layer: int | None = None, *, nextn: bool = False) -> Dims:
    """The dims rows are sized with: config facts under short names, plus block `layer`'s own (ratio, hash
    routing, MTP); `facts` stays reachable as `f` for a family's own keys."""
    f = facts
    ratios = f["compress_ratios"]
    return Dims(
        f=f, L=layer, nextn=nextn, HC=HC, mix=(2 + HC) * HC,
        H=f["hidden_size"], V=f["vocab_size"], nh=f["num_attention_heads"], hd=f["head_dim"], q=f["q_lora_rank"],
        og=f["o_groups"], ol=f["o_lora_rank"], E=f["n_routed_experts"], k=f["num_experts_per_tok"],
        inter=f["moe_intermediate_size"], ns=f["n_shared_experts"], ih=f["index_n_heads"], ihd=f["index_head_dim"],
        r=ratios[layer] if layer is not None and len(ratios) > layer else 0,
        hash=layer is not None and f["num_hash_layers"] > layer,
    )  # fmt: skip
