"""config.json -> the exact GGUF we write: metadata keys, tensor names, shapes and types.

Everything here is computed from the config alone, so `dsv4 plan` can size a model before it is downloaded and
`quant.convert` can check a checkpoint against the same list. What is written comes from tables declared elsewhere:
the family's tensor layout rows (`quant.archs`), the metadata keys (`quant.gguf_keys`) and the recipes' types
(`quant.recipes`); this module turns them into the tensor list and key/values of one config.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from quant import gguf_keys as keys
from quant.archs import ARCHS
from quant.archs.base import BF16, CONCAT, DENSE, EXPERTS, F32, I32, Dims, Row, block_dims
from quant.config import facts_of
from quant.errors import CheckpointError, UnsupportedError
from quant.fit_groups import KEEP, fit_group
from quant.gguf_keys import BOOL, FLOAT32, FLOAT32_ARRAY, INT32_ARRAY, STRING, UINT32
from quant.recipes import DENSE_RECIPES, EXPERT_RECIPES, RECIPES, check_recipe, fallback_type

T = GGMLQuantizationType


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: name, ggml ne (innermost first), ggml type, payload bytes."""

    name: str
    ne: tuple[int, ...]
    ggml_type: int
    nbytes: int


@dataclass(frozen=True)
class TensorPlan:
    """A TensorSpec plus how to make it: `kind` says which converter runs, `sources` are checkpoint names.

    kinds: "float" (F32/BF16/quantized from any float source), "experts" (sources = E weights in expert order),
    "i32" (tid2eid), "concat" (MTP eh_proj: sources joined on the input dim).
    """

    spec: TensorSpec
    kind: str
    sources: tuple[str, ...]
    requested: int


def nbytes_of(ne: tuple[int, ...], ggml_type: int) -> int:
    block, size = GGML_QUANT_SIZES[T(ggml_type)]
    return math.prod(ne) // block * size


def fit_type(wanted: int, row: int) -> int:
    """`wanted`, or its fallback (`quant.recipes`) when `row` is not a multiple of its block size."""
    t = int(wanted)
    while GGML_QUANT_SIZES[T(t)][0] > 1 and row % GGML_QUANT_SIZES[T(t)][0]:
        fallback = fallback_type(t)
        if fallback is None:
            raise UnsupportedError(f"{T(t).name} has no fallback for rows of {row} values")
        t = fallback
    return t


# ---- checkpoint name -> GGUF name ---------------------------------------------------------------------------

# Checkpoint names the layout rows do not list: a Vision-Exp router bias (mapped, and refused as not in the
# layout), and the MTP block's own hyper-connection head, which has no slot in a main-model deepseek4 GGUF.
EXTRA_NAMES: tuple[tuple[str, str | None], ...] = (
    ("layers.{layer}.ffn.gate.bias_vl", "blk.{layer}.exp_probs_b_vl.bias"),
    ("layers.{layer}.hc_head_fn", None),
    ("layers.{layer}.hc_head_base", None),
    ("layers.{layer}.hc_head_scale", None),
)


def _name_table() -> tuple[tuple[str, str | None], ...]:
    """Checkpoint name pattern -> GGUF name pattern ({layer}/{expert} placeholders; None = dropped on purpose), from
    every registered family's layout rows (`quant.archs`). Rows under "layers." also apply to the MTP block
    ("mtp.0.") when --mtp is given; `.scale` companions of a `.weight` are consumed with it."""
    table: dict[str, str | None] = {}
    for arch in ARCHS.values():
        for row in arch.root:
            table.update(dict.fromkeys(row.sources, row.name))
        for row in arch.block:
            table.update({f"layers.{{layer}}.{src}": f"blk.{{layer}}.{row.name}" for src in row.sources})
    return (*table.items(), *EXTRA_NAMES)


NAME_TABLE = _name_table()
# Whole families dropped on purpose: vision tower and aligner (V4.1 / Vision-Exp), image embeddings.
DROPPED_PREFIXES = ("vision_model.", "vision.", "visual.", "aligner.", "image_", "model.vision")


def _compile(pattern: str) -> re.Pattern[str]:
    body = re.escape(pattern).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(body + r"\Z")


_TABLE = [(_compile(src), dst) for src, dst in NAME_TABLE]


def gguf_name(name: str, facts: dict[str, Any], *, mtp: bool = False) -> str | None:
    """The GGUF tensor a checkpoint tensor goes into, or None when it is dropped on purpose.

    `.scale` companions map with their weight. MTP/DSpark (`mtp.N.*`) become layer `num_hidden_layers + N` only
    with `mtp` (and only a single MTP block, not DSpark); hash layers' `gate.bias` is dropped
    (docs/formats.md §Tensor names).
    Raises CheckpointError for a name nobody expects.
    """
    if name.startswith(DROPPED_PREFIXES):
        return None
    lookup = name[: -len(".scale")] + ".weight" if name.endswith(".scale") else name
    mtp_match = re.match(r"mtp\.(\d+)\.(.+)\Z", lookup)
    if mtp_match:
        if not (mtp and _mtp_layers(facts) > int(mtp_match.group(1))):
            return None
        lookup = f"layers.{facts['num_hidden_layers'] + int(mtp_match.group(1))}.{mtp_match.group(2)}"
    for pattern, dst in _TABLE:
        m = pattern.match(lookup)
        if m is None:
            continue
        if dst is None:
            return None
        layer = int(m.group("layer")) if "layer" in m.groupdict() else None
        if layer is not None and lookup.endswith("ffn.gate.bias") and layer < facts["num_hash_layers"]:
            return None
        return dst.format(layer=layer)
    raise CheckpointError(f"tensor {name!r} is not part of the DeepSeek V4 layout", hint="is this the right model?")


def _mtp_layers(facts: dict[str, Any]) -> int:
    """MTP blocks a main file can carry: llama.cpp supports exactly one, and DSpark stages are a separate model."""
    if any(k.startswith("dspark_") for k in facts):
        return 0
    return min(1, facts.get("num_nextn_predict_layers", 0))


# ---- the tensor list ----------------------------------------------------------------------------------------


# The GGUF type and converter kind of each way a layout row is stored (DENSE, EXPERTS, CONCAT: the recipe's types).
_STORED = {F32: (T.F32, "float"), BF16: (T.BF16, "float"), I32: (T.I32, "i32")}
_KIND = {DENSE: "float", EXPERTS: "experts", CONCAT: "concat"}


class _Builder:
    """Collects TensorPlans from layout rows: name, shape, type (recipe and fallback) and checkpoint sources."""

    def __init__(self, facts: dict[str, Any], experts: str, dense: str, mix: dict[str, str]) -> None:
        check_recipe(experts, dense)
        self.facts, self.experts, self.dense = facts, EXPERT_RECIPES[experts], DENSE_RECIPES[dense]
        self.mix = mix
        self.plans: list[TensorPlan] = []

    def add(self, row: Row, name: str, dims: Dims, prefix: str = "") -> None:
        """Row `row` as GGUF tensor `name`; its sources are under `prefix` ("layers.N." / "mtp.N." in a block)."""
        ne = tuple(int(n) for n in row.shape(dims))
        if row.stored in _STORED:
            wanted, kind = _STORED[row.stored]
        else:
            wanted, kind = (self.experts if row.stored == EXPERTS else self.dense), _KIND[row.stored]
        group = fit_group(name)
        if self.mix.get(group, KEEP) != KEEP:
            wanted = RECIPES[self.mix[group]].ggml_type
        sources: list[str] = []
        for source in row.sources:
            if "{expert}" in source:
                sources += [prefix + source.format(expert=e) for e in range(self.facts["n_routed_experts"])]
            else:
                sources.append(prefix + source)
        ggml_type = fit_type(wanted, ne[0])
        spec = TensorSpec(name, ne, ggml_type, nbytes_of(ne, ggml_type))
        self.plans.append(TensorPlan(spec, kind, tuple(sources), int(wanted)))


def plan_tensors(
    config: dict[str, Any],
    *,
    experts: str = "mxfp4",
    dense: str = "q8_0",
    mtp: bool = False,
    mix: dict[str, str] | None = None,
) -> list[TensorPlan]:
    """The ordered tensor list with sources: root first, then each block (the order llama.cpp's converter uses),
    from the family's layout rows (`quant.archs`); `mix` (fit group -> recipe, `quant.fit_groups`) overrides the
    recipe's type for the tensors of those groups."""
    f = facts_of(config)
    arch = ARCHS[f["arch"]]
    b = _Builder(f, experts, dense, mix or {})
    root = block_dims(f)
    for row in arch.root:
        b.add(row, row.name, root)
    n_main = f["num_hidden_layers"]
    n_mtp = _mtp_layers(f) if mtp else 0
    for layer in range(n_main + n_mtp):
        nextn = layer >= n_main
        dims = block_dims(f, layer, nextn=nextn)
        prefix = f"mtp.{layer - n_main}." if nextn else f"layers.{layer}."
        for row in arch.block:
            if row.when(dims):
                b.add(row, f"blk.{layer}.{row.name}", dims, prefix)
    return b.plans


def gguf_tensor_specs(
    config: dict[str, Any],
    *,
    experts: str = "mxfp4",
    dense: str = "q8_0",
    mtp: bool = False,
    mix: dict[str, str] | None = None,
) -> list[TensorSpec]:
    """The exact GGUF tensor list `dsv4 quantize` writes for this config.json (V4 and V4.1), a fitted `mix` too."""
    return [p.spec for p in plan_tensors(config, experts=experts, dense=dense, mtp=mtp, mix=mix)]


# ---- metadata -----------------------------------------------------------------------------------------------

KeyValue = tuple[str, Any, GGUFValueType, GGUFValueType | None]  # (key, value, type, array element type)


def typed_kv(key: str, value: Any, gguf_type: str) -> KeyValue:
    """A key/value with its gguf value types (`quant.gguf_keys` names them as plain data)."""
    V = GGUFValueType
    if gguf_type == INT32_ARRAY:
        return (key, [int(v) for v in value], V.ARRAY, V.INT32)
    if gguf_type == FLOAT32_ARRAY:
        return (key, [float(v) for v in value], V.ARRAY, V.FLOAT32)
    if gguf_type == FLOAT32:
        return (key, float(value), V.FLOAT32, None)
    if gguf_type == BOOL:
        return (key, bool(value), V.BOOL, None)
    return (key, value, V.STRING if gguf_type == STRING else V.UINT32, None)


def gguf_metadata(config: dict[str, Any], *, experts: str = "mxfp4", mtp: bool = False) -> list[KeyValue]:
    """`general.*` and architecture keys with their exact GGUF types, row by row from `quant.gguf_keys` and the
    family's own rows (docs/formats.md §GGUF metadata)."""
    f = facts_of(config)
    arch = ARCHS[f["arch"]]
    n_layers = f["num_hidden_layers"] + (_mtp_layers(f) if mtp else 0)
    derived = {
        keys.BLOCK_COUNT: n_layers,
        keys.EXPERT_GATING_FUNC: 4,
        keys.SWIGLU_CLAMP_EXP: [f["swiglu_limit"]] * n_layers,
        keys.SWIGLU_CLAMP_SHEXP: [f["swiglu_limit"]] * n_layers,
        keys.EMBEDDING_LENGTH_OUT: f["hidden_size"] * f["hc_mult"],
        keys.NEXTN_PREDICT_LAYERS: _mtp_layers(f),
    }
    rows = [(k, derived[k] if k in derived else f[k.config]) for k in keys.ARCH_KEYS]
    rope = f.get("rope_scaling") or {}
    if rope.get("type", rope.get("rope_type")):
        rope = {**rope, "type": rope.get("type", rope.get("rope_type"))}
        rows += [(k, rope[k.config]) for k in keys.ROPE_SCALING]
    if mtp and _mtp_layers(f):
        rows.append((keys.NEXTN_PREDICT_LAYERS, derived[keys.NEXTN_PREDICT_LAYERS]))
    rows += [(k, f[k.config]) for k in arch.keys]
    return [
        typed_kv(keys.ARCHITECTURE, arch.name, STRING),
        typed_kv(keys.FILE_TYPE, RECIPES[experts].ftype, UINT32),
        typed_kv(keys.QUANTIZATION_VERSION, 2, UINT32),
        *(typed_kv(k.of(arch.name), value, k.gguf_type) for k, value in rows),
    ]
