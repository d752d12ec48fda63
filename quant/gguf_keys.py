"""The GGUF metadata keys dsv4 writes and reads, declared once with their GGUF type and the config.json name each
comes from (docs/formats.md §GGUF metadata).

Architecture keys are `<arch>.<name>`; those every DeepSeek V4 family writes are here, a family's own ones are
its metadata rows in `quant.archs` (`Arch.keys`, e.g. V4.1's Engram keys). The converter writes from these rows
(`quant.mapping.gguf_metadata`), the planner reads the rows marked `fact` back under their config names
(`dsv4cli.plan.source`), and the header check (`dsv4cli.gguf_io.check`) and `dsv4 show` name keys through them.
Plain data: no gguf import (`quant.mapping` turns the type names into gguf's enums).
"""

from __future__ import annotations

from dataclasses import dataclass

# GGUF value types by name: scalars, and arrays as "<element>[]".
UINT32, FLOAT32, BOOL, STRING, INT32_ARRAY, FLOAT32_ARRAY = (
    "uint32",
    "float32",
    "bool",
    "string",
    "int32[]",
    "float32[]",
)


@dataclass(frozen=True)
class Key:
    """One architecture key: `<arch>.<name>`, written as `gguf_type` from config.json's `config` (None: derived
    from other facts, see `quant.mapping.gguf_metadata`); `fact`: the planner reads it back under `config`."""

    name: str
    gguf_type: str
    config: str | None = None
    fact: bool = False

    def of(self, arch: str) -> str:
        return f"{arch}.{self.name}"


CONTEXT_LENGTH = Key("context_length", UINT32, "max_position_embeddings", fact=True)
EMBEDDING_LENGTH = Key("embedding_length", UINT32, "hidden_size", fact=True)
BLOCK_COUNT = Key("block_count", UINT32, "num_hidden_layers", fact=True)  # + the MTP block of an --mtp GGUF
HEAD_COUNT = Key("attention.head_count", UINT32, "num_attention_heads", fact=True)
HEAD_COUNT_KV = Key("attention.head_count_kv", UINT32, "num_key_value_heads")
KEY_LENGTH = Key("attention.key_length", UINT32, "head_dim", fact=True)
VALUE_LENGTH = Key("attention.value_length", UINT32, "head_dim")
ROPE_DIMENSION_COUNT = Key("rope.dimension_count", UINT32, "qk_rope_head_dim")
ROPE_FREQ_BASE = Key("rope.freq_base", FLOAT32, "rope_theta")
EXPERT_COUNT = Key("expert_count", UINT32, "n_routed_experts", fact=True)
EXPERT_USED_COUNT = Key("expert_used_count", UINT32, "num_experts_per_tok", fact=True)
RMS_EPSILON = Key("attention.layer_norm_rms_epsilon", FLOAT32, "rms_norm_eps")
Q_LORA_RANK = Key("attention.q_lora_rank", UINT32, "q_lora_rank")
SLIDING_WINDOW = Key("attention.sliding_window", UINT32, "sliding_window", fact=True)
EXPERT_FFN_LENGTH = Key("expert_feed_forward_length", UINT32, "moe_intermediate_size")
EXPERT_SHARED_COUNT = Key("expert_shared_count", UINT32, "n_shared_experts")
EXPERT_WEIGHTS_SCALE = Key("expert_weights_scale", FLOAT32, "routed_scaling_factor")
EXPERT_WEIGHTS_NORM = Key("expert_weights_norm", BOOL, "norm_topk_prob")
EXPERT_GATING_FUNC = Key("expert_gating_func", UINT32)  # 4 = sqrtsoftplus, the only one deepseek4 has
SWIGLU_CLAMP_EXP = Key("swiglu_clamp_exp", FLOAT32_ARRAY, "swiglu_limit")  # one per block
SWIGLU_CLAMP_SHEXP = Key("swiglu_clamp_shexp", FLOAT32_ARRAY, "swiglu_limit")
INDEXER_HEAD_COUNT = Key("attention.indexer.head_count", UINT32, "index_n_heads", fact=True)
INDEXER_KEY_LENGTH = Key("attention.indexer.key_length", UINT32, "index_head_dim", fact=True)
INDEXER_TOP_K = Key("attention.indexer.top_k", UINT32, "index_topk", fact=True)
OUTPUT_GROUP_COUNT = Key("attention.output_group_count", UINT32, "o_groups")
OUTPUT_LORA_RANK = Key("attention.output_lora_rank", UINT32, "o_lora_rank")
COMPRESS_RATIOS = Key("attention.compress_ratios", INT32_ARRAY, "compress_ratios", fact=True)
COMPRESS_ROPE_FREQ_BASE = Key("attention.compress_rope_freq_base", FLOAT32, "compress_rope_theta")
HC_COUNT = Key("hyper_connection.count", UINT32, "hc_mult", fact=True)
HC_SINKHORN_ITERATIONS = Key("hyper_connection.sinkhorn_iterations", UINT32, "hc_sinkhorn_iters")
HC_EPSILON = Key("hyper_connection.epsilon", FLOAT32, "hc_eps")
HASH_LAYER_COUNT = Key("hash_layer_count", UINT32, "num_hash_layers")
EMBEDDING_LENGTH_OUT = Key("embedding_length_out", UINT32)  # hidden_size x hc_mult
# Written only when config.json has rope_scaling (config names inside that object; `type` may be `rope_type`).
ROPE_SCALING = (
    Key("rope.scaling.type", STRING, "type"),
    Key("rope.scaling.factor", FLOAT32, "factor"),
    Key("rope.scaling.original_context_length", UINT32, "original_max_position_embeddings"),
    Key("rope.scaling.yarn_beta_fast", FLOAT32, "beta_fast"),
    Key("rope.scaling.yarn_beta_slow", FLOAT32, "beta_slow"),
)
NEXTN_PREDICT_LAYERS = Key("nextn_predict_layers", UINT32, "num_nextn_predict_layers", fact=True)  # with --mtp

# What every DeepSeek V4 family writes, in this order (then ROPE_SCALING, NEXTN_PREDICT_LAYERS, `Arch.keys`).
ARCH_KEYS = (
    CONTEXT_LENGTH, EMBEDDING_LENGTH, BLOCK_COUNT, HEAD_COUNT, HEAD_COUNT_KV, KEY_LENGTH, VALUE_LENGTH,
    ROPE_DIMENSION_COUNT, ROPE_FREQ_BASE, EXPERT_COUNT, EXPERT_USED_COUNT, RMS_EPSILON, Q_LORA_RANK, SLIDING_WINDOW,
    EXPERT_FFN_LENGTH, EXPERT_SHARED_COUNT, EXPERT_WEIGHTS_SCALE, EXPERT_WEIGHTS_NORM, EXPERT_GATING_FUNC,
    SWIGLU_CLAMP_EXP, SWIGLU_CLAMP_SHEXP, INDEXER_HEAD_COUNT, INDEXER_KEY_LENGTH, INDEXER_TOP_K, OUTPUT_GROUP_COUNT,
    OUTPUT_LORA_RANK, COMPRESS_RATIOS, COMPRESS_ROPE_FREQ_BASE, HC_COUNT, HC_SINKHORN_ITERATIONS, HC_EPSILON,
    HASH_LAYER_COUNT, EMBEDDING_LENGTH_OUT,
)  # fmt: skip

# Generic keys dsv4 writes or reads by name.
ARCHITECTURE = "general.architecture"
FILE_TYPE = "general.file_type"
QUANTIZATION_VERSION = "general.quantization_version"
NAME = "general.name"
ALIGNMENT = "general.alignment"
CHAT_TEMPLATE = "tokenizer.chat_template"
TOKENIZER_MODEL = "tokenizer.ggml.model"
TOKENIZER_PRE = "tokenizer.ggml.pre"
TOKENS = "tokenizer.ggml.tokens"
MERGES = "tokenizer.ggml.merges"
BOS_TOKEN_ID = "tokenizer.ggml.bos_token_id"
EOS_TOKEN_ID = "tokenizer.ggml.eos_token_id"

# dsv4's own keys: the recipe and checkpoint a GGUF was made with, the expert error summary (JSON, patched in at
# the end of a conversion), the id stamped into every shard of one split conversion (`quant.gguf_set`).
EXPERTS_KEY = "dsv4.experts"
DENSE_KEY = "dsv4.dense"
SOURCE_KEY = "dsv4.source"
SUMMARY_KEY = "dsv4.expert_error_summary"
SET_ID_KEY = "dsv4.split.set_id"
DSV4_KEYS = {  # what dsv4 writes into every GGUF besides the tensors, vocabulary and architecture keys
    NAME: STRING,
    EXPERTS_KEY: STRING,
    DENSE_KEY: STRING,
    SOURCE_KEY: STRING,
    SUMMARY_KEY: STRING,
    SET_ID_KEY: STRING,
}
RECIPE_KEYS = {"experts": EXPERTS_KEY, "dense": DENSE_KEY}  # recipe role -> key
# A quant fitted to a size (`dsv4 quantize --size`): the budget in bytes, the chosen type per tensor group (JSON),
# and the importance matrix it was measured and quantized with (file name, calibration dataset, tokens).
BUDGET_KEY = "dsv4.fit.budget"
MIX_KEY = "dsv4.fit.mix"
IMATRIX_KEY = "dsv4.imatrix"
FIT_KEYS = {BUDGET_KEY: STRING, MIX_KEY: STRING, IMATRIX_KEY: STRING}  # only in fitted / imatrix quants

# An importance matrix file (`quant.imatrix`): llama.cpp's imatrix GGUF keys, plus dsv4's own.
IMATRIX_TYPE = "imatrix"  # general.type
IMATRIX_DATASETS = "imatrix.datasets"
IMATRIX_CHUNK_COUNT = "imatrix.chunk_count"
IMATRIX_CHUNK_SIZE = "imatrix.chunk_size"
IMATRIX_TOKENS = "dsv4.imatrix.tokens"
IMATRIX_FLOOR = "dsv4.imatrix.floor"
IMATRIX_MODEL = "dsv4.imatrix.model"


def facts_keys(extra: tuple[Key, ...] = ()) -> dict[str, Key]:
    """Config name -> key, for the keys the planner reads back (the shared ones plus a family's `extra`)."""
    return {k.config: k for k in (*ARCH_KEYS, NEXTN_PREDICT_LAYERS, *extra) if k.fact and k.config}
