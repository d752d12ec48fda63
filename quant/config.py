"""config.json -> checked facts: every key the converter uses is present, of the right type and within sane
bounds before any of it sizes a loop, a division or an allocation.

A config is untrusted input (a Hub repo, a file on disk): a zero vocabulary or 10^9 layers must be a one-line
error naming the key, not a ZeroDivisionError, a hang or a MemoryError. Bounds are generous multiples of the
largest DeepSeek V4 release (V4-Pro: 61 layers, 384 experts, hidden 7168).
"""

from __future__ import annotations

import math
from typing import Any

from quant.archs import ARCHS
from quant.archs.base import HC
from quant.errors import CheckpointError, UnsupportedError
from quant.files import shown

CONFIG_HINT = "use the config.json shipped with the checkpoint"
BIG = 1 << 20
# key -> (min, max) for integer facts
INTS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 1 << 16),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 1 << 12),
    "num_key_value_heads": (1, 1 << 12),
    "head_dim": (1, 1 << 13),
    "qk_rope_head_dim": (0, 1 << 13),
    "q_lora_rank": (1, 1 << 16),
    "o_lora_rank": (1, 1 << 16),
    "o_groups": (1, 1 << 12),
    "moe_intermediate_size": (1, 1 << 17),
    "n_routed_experts": (1, 1024),
    "n_shared_experts": (0, 64),
    "num_experts_per_tok": (1, 1024),
    "index_n_heads": (1, 1 << 12),
    "index_head_dim": (1, 1 << 13),
    "index_topk": (1, BIG),
    "sliding_window": (0, 1 << 24),
    "hc_mult": (1, 64),
    "hc_sinkhorn_iters": (0, 1 << 12),
    "max_position_embeddings": (1, 1 << 26),
    "vocab_size": (1, 1 << 22),
    "num_hash_layers": (0, 256),
    "num_nextn_predict_layers": (0, 64),
    "bos_token_id": (0, 1 << 22),
    "eos_token_id": (0, 1 << 22),
} | {key: bounds for arch in ARCHS.values() for key, bounds in arch.int_bounds.items()}
FLOATS = ("routed_scaling_factor", "hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta", "swiglu_limit")
LAYER_LISTS = tuple(key for arch in ARCHS.values() for key in arch.layer_lists)  # lists of layer ids
INT_LISTS = ("compress_ratios", *LAYER_LISTS)
ROW_COUNTS = {key: layers for arch in ARCHS.values() for key, layers in arch.row_counts.items()}


def _bad(key: str, what: str, value: Any) -> CheckpointError:
    return CheckpointError(f"config.json: {key} must be {what}, got {shown(value, 60)}", hint=CONFIG_HINT)


def _int(key: str, value: Any, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(key, f"an integer in [{low}, {high}]", value)
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(key, "a finite number", value)
    return float(value)


def _int_list(key: str, value: Any, low: int, high: int, max_len: int) -> list[int]:
    if not isinstance(value, list) or len(value) > max_len:
        raise _bad(key, f"a list of at most {max_len} integers", value)
    return [_int(f"{key}[{i}]", v, low, high) for i, v in enumerate(value)]


def _dict(key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(key, "an object", value)
    return value


def arch_of(config: dict[str, Any]) -> str:
    """The registered family (`quant.archs`) of `architectures`, a nested `text_config` naming its own; anything
    else is unsupported."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise _bad("architectures", "a list of class names", archs)
    nested_first = sorted(ARCHS.values(), key=lambda a: not a.text_config)
    for arch in nested_first:
        if arch.hf_class in archs or (arch.text_config and "text_config" in config):
            return arch.name
    raise UnsupportedError(
        f"config.json: architecture {shown(archs or config.get('model_type'))} is not DeepSeek V4",
        hint=f"dsv4 quantize converts {' and '.join(a.hf_class for a in ARCHS.values())} checkpoints",
    )


def facts_of(config: dict[str, Any]) -> dict[str, Any]:
    """Flat facts (text_config merged for V4.1) with every used key checked; adds `arch`, `expert_dtype` and
    `weight_block_size` (from quantization_config)."""
    arch = arch_of(config)
    facts = {**config, **_dict("text_config", config.get("text_config"))}
    quant = _dict("quantization_config", config.get("quantization_config"))
    required = ARCHS[arch].required
    missing = [k for k in required if k not in facts]
    if missing:
        raise CheckpointError(
            f"config.json: missing key {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint=CONFIG_HINT,
        )
    facts["arch"] = arch
    facts.setdefault("num_hash_layers", 0)
    for key, (low, high) in INTS.items():
        if key in facts:
            facts[key] = _int(key, facts[key], low, high)
    for key in FLOATS:
        _number(key, facts[key])
    layers = facts["num_hidden_layers"]
    n_all = layers + facts.get("num_nextn_predict_layers", 0)
    for key in INT_LISTS:
        if key in facts:
            facts[key] = _int_list(key, facts[key], 0, 1 << 16, max(n_all, 1) + 64)
    _check_relations(facts, layers, n_all)
    if not isinstance(facts["norm_topk_prob"], bool):
        raise _bad("norm_topk_prob", "true or false", facts["norm_topk_prob"])
    expert_dtype = facts.get("expert_dtype") or quant.get("expert_dtype") or "fp8"
    if expert_dtype not in ("fp4", "fp8"):
        raise _bad("expert_dtype", "'fp4' or 'fp8'", expert_dtype)
    facts["expert_dtype"] = expert_dtype
    block = quant.get("weight_block_size") or [128, 128]
    facts["weight_block_size"] = _int_list("quantization_config.weight_block_size", block, 1, 1 << 12, 2) or [128]
    _check_rope_scaling(facts.get("rope_scaling"))
    if facts["hc_mult"] != HC:
        raise UnsupportedError(f"config.json: hc_mult {facts['hc_mult']} (llama.cpp's deepseek4 graph needs 4)")
    if facts["scoring_func"] != "sqrtsoftplus":
        scoring = shown(facts["scoring_func"])
        raise UnsupportedError(f"config.json: scoring_func {scoring} (deepseek4 needs sqrtsoftplus)")
    return facts


def _check_relations(facts: dict[str, Any], layers: int, n_all: int) -> None:
    """Values that size each other: counts within counts, divisions that must be exact."""
    if len(facts["compress_ratios"]) < layers:
        raise CheckpointError("config.json: compress_ratios is shorter than num_hidden_layers", hint=CONFIG_HINT)
    if facts["num_experts_per_tok"] > facts["n_routed_experts"]:
        raise _bad(
            "num_experts_per_tok",
            f"at most n_routed_experts ({facts['n_routed_experts']})",
            facts["num_experts_per_tok"],
        )
    if facts["num_hash_layers"] > layers:
        raise _bad("num_hash_layers", f"at most num_hidden_layers ({layers})", facts["num_hash_layers"])
    width = facts["num_attention_heads"] * facts["head_dim"]
    if width % facts["o_groups"]:
        raise _bad("o_groups", f"a divisor of num_attention_heads x head_dim ({width})", facts["o_groups"])
    for key in LAYER_LISTS:
        if any(i >= n_all for i in facts.get(key, [])):
            raise _bad(key, f"layer ids below {n_all}", facts[key])
    for key, layers_key in ROW_COUNTS.items():
        if key in facts:
            rows = _int_list(key, facts[key], 1, 1 << 34, 256)
            if len(rows) != len(facts[layers_key]):
                raise _bad(key, f"one row count per {layers_key.removesuffix('_layer_ids')} layer", rows)
    for key in ("bos_token_id", "eos_token_id"):
        if facts.get(key, 0) >= facts["vocab_size"]:
            raise _bad(key, f"below vocab_size ({facts['vocab_size']})", facts[key])


def _check_rope_scaling(rope: Any) -> None:
    rope = _dict("rope_scaling", rope)
    if rope.get("type", rope.get("rope_type")):
        if not isinstance(rope.get("type", rope.get("rope_type")), str):
            raise _bad("rope_scaling.type", "a string", rope.get("type", rope.get("rope_type")))
        for key in ("factor", "beta_fast", "beta_slow"):
            _number(f"rope_scaling.{key}", rope.get(key))
        _int("rope_scaling.original_max_position_embeddings", rope.get("original_max_position_embeddings"), 1, 1 << 26)
