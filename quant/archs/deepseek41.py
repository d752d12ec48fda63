"""DeepSeek V4.1 (`deepseek41`, DeepseekV41ForCausalLM): V4 plus Engram n-gram tables, with compressed caches only
on listed KV-source layers and indexer queries only on index-source layers (docs/formats.md §Engram).

No GGUF spec is stable yet and no llama.cpp that dsv4 can install loads it: dsv4 converts and plans it (its layout
and KV cache are our best guess) and refuses to run it.
"""

from __future__ import annotations

from typing import Any

from quant.archs import deepseek4 as v4
from quant.archs.base import BF16, DENSE, F32, HC, Arch, Dims, LookupClass, Row
from quant.gguf_keys import INT32_ARRAY, UINT32, Key

REQUIRED = (
    *v4.REQUIRED, "kv_source_layer_ids", "index_source_layer_ids", "engram_layer_ids", "engram_num_embeddings",
    "engram_max_ngram_size", "engram_n_heads", "engram_head_dim",
)  # fmt: skip
KEYS = (
    Key("engram.layer_ids", INT32_ARRAY, "engram_layer_ids"),
    Key("engram.head_count", UINT32, "engram_n_heads", fact=True),
    Key("engram.key_length", UINT32, "engram_head_dim"),
    Key("engram.max_ngram_size", UINT32, "engram_max_ngram_size", fact=True),
    Key("attention.kv_source_layer_ids", INT32_ARRAY, "kv_source_layer_ids", fact=True),
    Key("attention.index_source_layer_ids", INT32_ARRAY, "index_source_layer_ids", fact=True),
)
# Registry facts with no V4 default; the rows of the Engram tables come per model.
CONFIG_DEFAULTS = {
    "kv_source_layer_ids": [],
    "index_source_layer_ids": [],
    "candidate_source_layer_id": 0,
    "candidate_topk_blocks": 2048,
    "candidate_block_size": 8,
    "engram_layer_ids": [],
    "engram_num_embeddings": [],
    "engram_max_ngram_size": 4,
    "engram_vocab_size": 16000000,
    "engram_n_heads": 8,
    "engram_head_dim": 256,
    "engram_pad_token_id": 2,
    "weight_block_size": 128,
}


def kv_source(d: Dims) -> bool:
    return d.L in d.f["kv_source_layer_ids"]


def gated_kv_source(d: Dims) -> bool:
    return kv_source(d) and d.r > 1


def index_source(d: Dims) -> bool:
    return d.L in d.f["index_source_layer_ids"]


def engram(d: Dims) -> bool:
    return d.L in d.f["engram_layer_ids"]


def engram_rows_per_token(facts: dict[str, Any]) -> int:
    """Rows one Engram layer reads per token: one per head for each n-gram order 2..max (docs/formats.md §Engram)."""
    return (int(facts.get("engram_max_ngram_size", 4)) - 1) * int(facts.get("engram_n_heads", 8))


def _engram_rows(d: Dims) -> tuple[int, int]:
    """One table per Engram layer, `engram_num_embeddings` rows in the layer's order."""
    return (d.f["engram_head_dim"], d.f["engram_num_embeddings"][d.f["engram_layer_ids"].index(d.L)])


def _engram_wkv(d: Dims) -> tuple[int, int]:
    f = d.f
    return ((f["engram_max_ngram_size"] - 1) * f["engram_n_heads"] * f["engram_head_dim"], d.H * (HC + 1))


ATTENTION = (
    Row("attn_compressor_kv.weight", lambda d: (d.H, d.hd), BF16, ("attn.compressor.wkv.weight",), kv_source),
    Row("attn_compressor_gate.weight", lambda d: (d.H, d.hd), BF16, ("attn.compressor.wgate.weight",), gated_kv_source),
    Row("attn_compressor_norm.weight", lambda d: (d.hd,), F32, ("attn.compressor.norm.weight",), kv_source),
    Row("indexer.attn_k.weight", lambda d: (d.hd, d.ihd), BF16, ("attn.indexer.wk.weight",), kv_source),
    Row("indexer.k_norm.weight", lambda d: (d.ihd,), F32, ("attn.indexer.k_norm.weight",), kv_source),
    Row("indexer.attn_q_b.weight", lambda d: (d.q, d.ih * d.ihd), DENSE, ("attn.indexer.wq_b.weight",), index_source),
    Row("indexer.proj.weight", lambda d: (d.H, d.ih), BF16, ("attn.indexer.weights_proj.weight",), index_source),
)  # fmt: skip
ENGRAM = (
    Row("engram_embd.weight", _engram_rows, DENSE, ("engram.embed.weight",), engram),
    Row("engram_wkv.weight", _engram_wkv, DENSE, ("engram.wkv.weight",), engram),
    Row("engram_q.weight", lambda d: (d.H, HC), F32, ("engram.q_weight",), engram),
    Row("engram_k.weight", lambda d: (d.H, HC), F32, ("engram.k_weight",), engram),
)

ARCH = Arch(
    name="deepseek41",
    title="DeepSeek V4.1",
    hf_class="DeepseekV41ForCausalLM",
    model_type="deepseek_v41",
    required=REQUIRED,
    root=v4.ROOT_TRUNK,
    block=v4.ATTENTION + ATTENTION + v4.FFN + ENGRAM + v4.NEXTN,
    keys=KEYS,
    text_config=True,
    config_defaults=CONFIG_DEFAULTS,
    int_bounds={"engram_max_ngram_size": (2, 64), "engram_n_heads": (1, 1 << 12), "engram_head_dim": (1, 1 << 13)},
    layer_lists=("kv_source_layer_ids", "index_source_layer_ids", "engram_layer_ids"),
    row_counts={"engram_num_embeddings": "engram_layer_ids"},
    plan_classes=(LookupClass("engram", r"\.engram_embd\.", engram_rows_per_token),),
    kv_by_source_layers=True,
    runs=False,
    refusal=(
        "the bundled llama.cpp (llama-cpp-python 0.3.36) has no deepseek41 architecture yet; "
        "V4.1 GGUFs can be quantized and planned but not run"
    ),
    refusal_hint="chat with a V4 model such as deepseek-v4-flash",
    plan_warning=(
        "deepseek41 (V4.1) does not load in the bundled llama.cpp; this plan is for a fork with Engram support "
        "and its KV cache is a best guess"
    ),
)
