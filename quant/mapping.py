"""config.json -> the exact GGUF we write: metadata keys, tensor names, shapes and types.

Everything here is computed from the config alone, so `dsv4 plan` can size a model before it is downloaded and
`quant.convert` can check a checkpoint against the same list. Key names and types follow
docs/formats.md §GGUF metadata (written as literals: the `gguf` package has no DEEPSEEK4 constants); tensor names and
shapes follow §Tensor names, type rules §Quantization types. V4.1 (`deepseek41`) has no stable GGUF spec;
its layout is our best guess.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from quant.arch import V41
from quant.config import HC, facts_of
from quant.errors import CheckpointError, UnsupportedError
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

# {layer}/{expert} are placeholders; None = dropped on purpose. `.scale` companions of a `.weight` are consumed
# with it. Rows under "layers." also apply to the MTP block ("mtp.0.") when --mtp is given.
NAME_TABLE: tuple[tuple[str, str | None], ...] = (
    ("embed.weight", "token_embd.weight"),
    ("norm.weight", "output_norm.weight"),
    ("head.weight", "output.weight"),
    ("hc_head_fn", "output_hc_fn.weight"),
    ("hc_head_base", "output_hc_base.weight"),
    ("hc_head_scale", "output_hc_scale.weight"),
    ("layers.{layer}.attn_norm.weight", "blk.{layer}.attn_norm.weight"),
    ("layers.{layer}.ffn_norm.weight", "blk.{layer}.ffn_norm.weight"),
    ("layers.{layer}.attn.attn_sink", "blk.{layer}.attn_sinks.weight"),
    ("layers.{layer}.attn.wq_a.weight", "blk.{layer}.attn_q_a.weight"),
    ("layers.{layer}.attn.q_norm.weight", "blk.{layer}.attn_q_a_norm.weight"),
    ("layers.{layer}.attn.wq_b.weight", "blk.{layer}.attn_q_b.weight"),
    ("layers.{layer}.attn.wkv.weight", "blk.{layer}.attn_kv.weight"),
    ("layers.{layer}.attn.kv_norm.weight", "blk.{layer}.attn_kv_a_norm.weight"),
    ("layers.{layer}.attn.wo_a.weight", "blk.{layer}.attn_output_a.weight"),
    ("layers.{layer}.attn.wo_b.weight", "blk.{layer}.attn_output_b.weight"),
    ("layers.{layer}.hc_attn_fn", "blk.{layer}.hc_attn_fn.weight"),
    ("layers.{layer}.hc_attn_base", "blk.{layer}.hc_attn_base.weight"),
    ("layers.{layer}.hc_attn_scale", "blk.{layer}.hc_attn_scale.weight"),
    ("layers.{layer}.hc_ffn_fn", "blk.{layer}.hc_ffn_fn.weight"),
    ("layers.{layer}.hc_ffn_base", "blk.{layer}.hc_ffn_base.weight"),
    ("layers.{layer}.hc_ffn_scale", "blk.{layer}.hc_ffn_scale.weight"),
    ("layers.{layer}.attn.compressor.wkv.weight", "blk.{layer}.attn_compressor_kv.weight"),
    ("layers.{layer}.attn.compressor.wgate.weight", "blk.{layer}.attn_compressor_gate.weight"),
    ("layers.{layer}.attn.compressor.ape", "blk.{layer}.attn_compressor_ape.weight"),
    ("layers.{layer}.attn.compressor.norm.weight", "blk.{layer}.attn_compressor_norm.weight"),
    ("layers.{layer}.attn.indexer.weights_proj.weight", "blk.{layer}.indexer.proj.weight"),
    ("layers.{layer}.attn.indexer.wq_b.weight", "blk.{layer}.indexer.attn_q_b.weight"),
    ("layers.{layer}.attn.indexer.compressor.wkv.weight", "blk.{layer}.indexer_compressor_kv.weight"),
    ("layers.{layer}.attn.indexer.compressor.wgate.weight", "blk.{layer}.indexer_compressor_gate.weight"),
    ("layers.{layer}.attn.indexer.compressor.ape", "blk.{layer}.indexer_compressor_ape.weight"),
    ("layers.{layer}.attn.indexer.compressor.norm.weight", "blk.{layer}.indexer_compressor_norm.weight"),
    ("layers.{layer}.attn.indexer.wk.weight", "blk.{layer}.indexer.attn_k.weight"),
    ("layers.{layer}.attn.indexer.k_norm.weight", "blk.{layer}.indexer.k_norm.weight"),
    ("layers.{layer}.ffn.gate.weight", "blk.{layer}.ffn_gate_inp.weight"),
    ("layers.{layer}.ffn.gate.tid2eid", "blk.{layer}.ffn_gate_tid2eid.weight"),
    ("layers.{layer}.ffn.gate.bias", "blk.{layer}.exp_probs_b.bias"),
    ("layers.{layer}.ffn.gate.bias_vl", "blk.{layer}.exp_probs_b_vl.bias"),
    ("layers.{layer}.ffn.experts.{expert}.w1.weight", "blk.{layer}.ffn_gate_exps.weight"),
    ("layers.{layer}.ffn.experts.{expert}.w3.weight", "blk.{layer}.ffn_up_exps.weight"),
    ("layers.{layer}.ffn.experts.{expert}.w2.weight", "blk.{layer}.ffn_down_exps.weight"),
    ("layers.{layer}.ffn.shared_experts.w1.weight", "blk.{layer}.ffn_gate_shexp.weight"),
    ("layers.{layer}.ffn.shared_experts.w3.weight", "blk.{layer}.ffn_up_shexp.weight"),
    ("layers.{layer}.ffn.shared_experts.w2.weight", "blk.{layer}.ffn_down_shexp.weight"),
    ("layers.{layer}.engram.embed.weight", "blk.{layer}.engram_embd.weight"),
    ("layers.{layer}.engram.wkv.weight", "blk.{layer}.engram_wkv.weight"),
    ("layers.{layer}.engram.q_weight", "blk.{layer}.engram_q.weight"),
    ("layers.{layer}.engram.k_weight", "blk.{layer}.engram_k.weight"),
    ("layers.{layer}.e_proj.weight", "blk.{layer}.nextn.eh_proj.weight"),
    ("layers.{layer}.h_proj.weight", "blk.{layer}.nextn.eh_proj.weight"),
    ("layers.{layer}.enorm.weight", "blk.{layer}.nextn.enorm.weight"),
    ("layers.{layer}.hnorm.weight", "blk.{layer}.nextn.hnorm.weight"),
    ("layers.{layer}.norm.weight", "blk.{layer}.nextn.shared_head_norm.weight"),
    # The MTP block's own hyper-connection head has no slot in a main-model deepseek4 GGUF.
    ("layers.{layer}.hc_head_fn", None),
    ("layers.{layer}.hc_head_base", None),
    ("layers.{layer}.hc_head_scale", None),
)
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


# GGUF name pattern -> the checkpoint name patterns it is made from (two for the MTP eh_proj, in concat order).
_SOURCES: dict[str, list[str]] = {}
for _src, _dst in NAME_TABLE:
    if _dst is not None:
        _SOURCES.setdefault(_dst, []).append(_src)


class _Builder:
    """Collects TensorPlans; the checkpoint sources of each GGUF tensor come from NAME_TABLE, never written twice."""

    def __init__(self, facts: dict[str, Any], experts: str, dense: str) -> None:
        check_recipe(experts, dense)
        self.facts, self.experts, self.dense = facts, EXPERT_RECIPES[experts], DENSE_RECIPES[dense]
        self.plans: list[TensorPlan] = []
        self.layer: int | None = None  # the block being built, and its checkpoint prefix ("layers.N." / "mtp.N.")
        self.prefix = ""

    def sources(self, name: str) -> tuple[str, ...]:
        """Checkpoint names of GGUF tensor `name` in the current block (experts expanded in expert order)."""
        pattern = name if self.layer is None else name.replace(f"blk.{self.layer}.", "blk.{layer}.", 1)
        out: list[str] = []
        for source in _SOURCES[pattern]:
            source = source.replace("layers.{layer}.", self.prefix)
            if "{expert}" in source:
                out += [source.format(expert=e) for e in range(self.facts["n_routed_experts"])]
            else:
                out.append(source)
        return tuple(out)

    def add(self, name: str, ne: tuple[int, ...], wanted: int, kind: str) -> None:
        ggml_type = fit_type(wanted, ne[0])
        spec = TensorSpec(name, tuple(int(n) for n in ne), ggml_type, nbytes_of(ne, ggml_type))
        self.plans.append(TensorPlan(spec, kind, self.sources(name), int(wanted)))

    def f32(self, name: str, ne: tuple[int, ...]) -> None:
        self.add(name, ne, T.F32, "float")

    def bf16(self, name: str, ne: tuple[int, ...]) -> None:
        self.add(name, ne, T.BF16, "float")

    def dense_q(self, name: str, ne: tuple[int, ...]) -> None:
        self.add(name, ne, self.dense, "float")


def plan_tensors(
    config: dict[str, Any], *, experts: str = "mxfp4", dense: str = "q8_0", mtp: bool = False
) -> list[TensorPlan]:
    """The ordered tensor list with sources: root first, then each block (the order llama.cpp's converter uses)."""
    f = facts_of(config)
    b = _Builder(f, experts, dense)
    H, V = f["hidden_size"], f["vocab_size"]
    v41 = f["arch"] == V41
    b.bf16("token_embd.weight", (H, V))
    b.f32("output_norm.weight", (H,))
    b.bf16("output.weight", (H, V))
    if not v41:
        b.f32("output_hc_fn.weight", (HC * H, HC))
        b.f32("output_hc_base.weight", (HC,))
        b.f32("output_hc_scale.weight", (1,))
    n_main = f["num_hidden_layers"]
    n_mtp = _mtp_layers(f) if mtp else 0
    for layer in range(n_main + n_mtp):
        b.layer, b.prefix = layer, f"layers.{layer}." if layer < n_main else f"mtp.{layer - n_main}."
        _block(b, f, layer, nextn=layer >= n_main)
    return b.plans


def _block(b: _Builder, f: dict[str, Any], L: int, *, nextn: bool) -> None:
    H, nh, hd, q = f["hidden_size"], f["num_attention_heads"], f["head_dim"], f["q_lora_rank"]
    og, ol, E, k, V = f["o_groups"], f["o_lora_rank"], f["n_routed_experts"], f["num_experts_per_tok"], f["vocab_size"]
    inter, ns, ih, ihd = f["moe_intermediate_size"], f["n_shared_experts"], f["index_n_heads"], f["index_head_dim"]
    mix = (2 + HC) * HC
    r = f["compress_ratios"][L] if len(f["compress_ratios"]) > L else 0
    v41 = f["arch"] == V41
    g = f"blk.{L}."
    b.f32(g + "attn_norm.weight", (H,))
    b.f32(g + "attn_sinks.weight", (nh,))
    b.dense_q(g + "attn_q_a.weight", (H, q))
    b.f32(g + "attn_q_a_norm.weight", (q,))
    b.dense_q(g + "attn_q_b.weight", (q, nh * hd))
    b.dense_q(g + "attn_kv.weight", (H, hd))
    b.f32(g + "attn_kv_a_norm.weight", (hd,))
    b.dense_q(g + "attn_output_a.weight", (nh * hd // og, og * ol))
    b.dense_q(g + "attn_output_b.weight", (og * ol, H))
    for part in ("attn", "ffn"):
        b.f32(f"{g}hc_{part}_fn.weight", (HC * H, mix))
        b.f32(f"{g}hc_{part}_base.weight", (mix,))
        b.f32(f"{g}hc_{part}_scale.weight", (3,))
    if v41:
        _v41_attention(b, f, L)
    elif r:
        coff = 2 if r == 4 else 1
        b.bf16(g + "attn_compressor_kv.weight", (H, coff * hd))
        b.bf16(g + "attn_compressor_gate.weight", (H, coff * hd))
        b.f32(g + "attn_compressor_ape.weight", (coff * hd, r))
        b.f32(g + "attn_compressor_norm.weight", (hd,))
        if r == 4:
            b.bf16(g + "indexer.proj.weight", (H, ih))
            b.dense_q(g + "indexer.attn_q_b.weight", (q, ih * ihd))
            b.bf16(g + "indexer_compressor_kv.weight", (H, 2 * ihd))
            b.bf16(g + "indexer_compressor_gate.weight", (H, 2 * ihd))
            b.f32(g + "indexer_compressor_ape.weight", (2 * ihd, 4))
            b.f32(g + "indexer_compressor_norm.weight", (ihd,))
    b.f32(g + "ffn_norm.weight", (H,))
    b.bf16(g + "ffn_gate_inp.weight", (H, E))
    if f["num_hash_layers"] > L:
        b.add(g + "ffn_gate_tid2eid.weight", (k, V), T.I32, "i32")
    else:
        b.f32(g + "exp_probs_b.bias", (E,))
    for proj, ne in (("gate", (H, inter, E)), ("up", (H, inter, E)), ("down", (inter, H, E))):
        b.add(f"{g}ffn_{proj}_exps.weight", ne, b.experts, "experts")
    b.dense_q(g + "ffn_gate_shexp.weight", (H, inter * ns))
    b.dense_q(g + "ffn_up_shexp.weight", (H, inter * ns))
    b.dense_q(g + "ffn_down_shexp.weight", (inter * ns, H))
    if v41 and L in f["engram_layer_ids"]:
        i = f["engram_layer_ids"].index(L)
        hd_e, heads, ngram = f["engram_head_dim"], f["engram_n_heads"], f["engram_max_ngram_size"]
        b.dense_q(g + "engram_embd.weight", (hd_e, f["engram_num_embeddings"][i]))
        b.dense_q(g + "engram_wkv.weight", ((ngram - 1) * heads * hd_e, H * (HC + 1)))
        b.f32(g + "engram_q.weight", (H, HC))
        b.f32(g + "engram_k.weight", (H, HC))
    if nextn:
        b.add(g + "nextn.eh_proj.weight", (2 * H, H), b.dense, "concat")
        b.f32(g + "nextn.enorm.weight", (H,))
        b.f32(g + "nextn.hnorm.weight", (H,))
        b.f32(g + "nextn.shared_head_norm.weight", (H,))


def _v41_attention(b: _Builder, f: dict[str, Any], L: int) -> None:
    """V4.1: only KV-source layers own a compressor (+ indexer key path), only index-source layers a query path."""
    H, hd, q, ih, ihd = f["hidden_size"], f["head_dim"], f["q_lora_rank"], f["index_n_heads"], f["index_head_dim"]
    g = f"blk.{L}."
    if L in f["kv_source_layer_ids"]:
        b.bf16(g + "attn_compressor_kv.weight", (H, hd))
        if f["compress_ratios"][L] > 1:
            b.bf16(g + "attn_compressor_gate.weight", (H, hd))
        b.f32(g + "attn_compressor_norm.weight", (hd,))
        b.bf16(g + "indexer.attn_k.weight", (hd, ihd))
        b.f32(g + "indexer.k_norm.weight", (ihd,))
    if L in f["index_source_layer_ids"]:
        b.dense_q(g + "indexer.attn_q_b.weight", (q, ih * ihd))
        b.bf16(g + "indexer.proj.weight", (H, ih))


def gguf_tensor_specs(
    config: dict[str, Any], *, experts: str = "mxfp4", dense: str = "q8_0", mtp: bool = False
) -> list[TensorSpec]:
    """The exact GGUF tensor list `dsv4 quantize` writes for this config.json (V4 and V4.1)."""
    return [p.spec for p in plan_tensors(config, experts=experts, dense=dense, mtp=mtp)]


# ---- metadata -----------------------------------------------------------------------------------------------

KeyValue = tuple[str, Any, GGUFValueType, GGUFValueType | None]  # (key, value, type, array element type)


def gguf_metadata(config: dict[str, Any], *, experts: str = "mxfp4", mtp: bool = False) -> list[KeyValue]:
    """`general.*` and architecture keys with their exact GGUF types (docs/formats.md §GGUF metadata)."""
    V = GGUFValueType  # local: V is the vocab size in the tensor-list code above
    f = facts_of(config)
    arch = f["arch"]
    n_layers = f["num_hidden_layers"] + (_mtp_layers(f) if mtp else 0)
    rope = f.get("rope_scaling") or {}
    a = arch + "."
    kv: list[KeyValue] = [
        ("general.architecture", arch, V.STRING, None),
        ("general.file_type", RECIPES[experts].ftype, V.UINT32, None),
        ("general.quantization_version", 2, V.UINT32, None),
        (a + "context_length", f["max_position_embeddings"], V.UINT32, None),
        (a + "embedding_length", f["hidden_size"], V.UINT32, None),
        (a + "block_count", n_layers, V.UINT32, None),
        (a + "attention.head_count", f["num_attention_heads"], V.UINT32, None),
        (a + "attention.head_count_kv", f["num_key_value_heads"], V.UINT32, None),
        (a + "attention.key_length", f["head_dim"], V.UINT32, None),
        (a + "attention.value_length", f["head_dim"], V.UINT32, None),
        (a + "rope.dimension_count", f["qk_rope_head_dim"], V.UINT32, None),
        (a + "rope.freq_base", float(f["rope_theta"]), V.FLOAT32, None),
        (a + "expert_count", f["n_routed_experts"], V.UINT32, None),
        (a + "expert_used_count", f["num_experts_per_tok"], V.UINT32, None),
        (a + "attention.layer_norm_rms_epsilon", float(f["rms_norm_eps"]), V.FLOAT32, None),
        (a + "attention.q_lora_rank", f["q_lora_rank"], V.UINT32, None),
        (a + "attention.sliding_window", f["sliding_window"], V.UINT32, None),
        (a + "expert_feed_forward_length", f["moe_intermediate_size"], V.UINT32, None),
        (a + "expert_shared_count", f["n_shared_experts"], V.UINT32, None),
        (a + "expert_weights_scale", float(f["routed_scaling_factor"]), V.FLOAT32, None),
        (a + "expert_weights_norm", bool(f["norm_topk_prob"]), V.BOOL, None),
        (a + "expert_gating_func", 4, V.UINT32, None),
        (a + "swiglu_clamp_exp", [float(f["swiglu_limit"])] * n_layers, V.ARRAY, V.FLOAT32),
        (a + "swiglu_clamp_shexp", [float(f["swiglu_limit"])] * n_layers, V.ARRAY, V.FLOAT32),
        (a + "attention.indexer.head_count", f["index_n_heads"], V.UINT32, None),
        (a + "attention.indexer.key_length", f["index_head_dim"], V.UINT32, None),
        (a + "attention.indexer.top_k", f["index_topk"], V.UINT32, None),
        (a + "attention.output_group_count", f["o_groups"], V.UINT32, None),
        (a + "attention.output_lora_rank", f["o_lora_rank"], V.UINT32, None),
        (a + "attention.compress_ratios", [int(r) for r in f["compress_ratios"]], V.ARRAY, V.INT32),
        (a + "attention.compress_rope_freq_base", float(f["compress_rope_theta"]), V.FLOAT32, None),
        (a + "hyper_connection.count", f["hc_mult"], V.UINT32, None),
        (a + "hyper_connection.sinkhorn_iterations", f["hc_sinkhorn_iters"], V.UINT32, None),
        (a + "hyper_connection.epsilon", float(f["hc_eps"]), V.FLOAT32, None),
        (a + "hash_layer_count", f["num_hash_layers"], V.UINT32, None),
        (a + "embedding_length_out", f["hidden_size"] * f["hc_mult"], V.UINT32, None),
    ]
    if rope.get("type", rope.get("rope_type")):
        kv += [
            (a + "rope.scaling.type", rope.get("type", rope.get("rope_type")), V.STRING, None),
            (a + "rope.scaling.factor", float(rope["factor"]), V.FLOAT32, None),
            (a + "rope.scaling.original_context_length", rope["original_max_position_embeddings"], V.UINT32, None),
            (a + "rope.scaling.yarn_beta_fast", float(rope["beta_fast"]), V.FLOAT32, None),
            (a + "rope.scaling.yarn_beta_slow", float(rope["beta_slow"]), V.FLOAT32, None),
        ]
    if mtp and _mtp_layers(f):
        kv.append((a + "nextn_predict_layers", _mtp_layers(f), V.UINT32, None))
    if arch == V41:
        kv += [
            (a + "engram.layer_ids", [int(i) for i in f["engram_layer_ids"]], V.ARRAY, V.INT32),
            (a + "engram.head_count", f["engram_n_heads"], V.UINT32, None),
            (a + "engram.key_length", f["engram_head_dim"], V.UINT32, None),
            (a + "engram.max_ngram_size", f["engram_max_ngram_size"], V.UINT32, None),
            (a + "attention.kv_source_layer_ids", [int(i) for i in f["kv_source_layer_ids"]], V.ARRAY, V.INT32),
            (a + "attention.index_source_layer_ids", [int(i) for i in f["index_source_layer_ids"]], V.ARRAY, V.INT32),
        ]
    return kv
