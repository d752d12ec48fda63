"""quant.mapping against expectations written here from docs/formats.md (§GGUF metadata, §Tensor names)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType

from dsv4cli.models.registry import get_model
from quant.errors import CheckpointError, UnsupportedError
from quant.mapping import gguf_metadata, gguf_name, gguf_tensor_specs

F32, BF16, Q8_0, MXFP4, I32 = 0, 30, 8, 39, 26


def expected_v4_table(c: dict) -> list[tuple[str, tuple[int, ...], int]]:
    """docs/formats.md §Tensor names, row by row, with the reference converter's types."""
    H, V, nh, hd, q = c["hidden_size"], c["vocab_size"], c["num_attention_heads"], c["head_dim"], c["q_lora_rank"]
    og, ol, E, k, inter = (
        c["o_groups"],
        c["o_lora_rank"],
        c["n_routed_experts"],
        c["num_experts_per_tok"],
        c["moe_intermediate_size"],
    )
    ns, ih, ihd, hc, mix = c["n_shared_experts"], c["index_n_heads"], c["index_head_dim"], 4, 24
    rows = [
        ("token_embd.weight", (H, V), BF16),
        ("output_norm.weight", (H,), F32),
        ("output.weight", (H, V), BF16),
        ("output_hc_fn.weight", (hc * H, hc), F32),
        ("output_hc_base.weight", (hc,), F32),
        ("output_hc_scale.weight", (1,), F32),
    ]
    for n in range(c["num_hidden_layers"]):
        r = c["compress_ratios"][n]
        coff = 2 if r == 4 else 1
        b = f"blk.{n}."
        rows += [
            (b + "attn_norm.weight", (H,), F32),
            (b + "attn_sinks.weight", (nh,), F32),
            (b + "attn_q_a.weight", (H, q), Q8_0),
            (b + "attn_q_a_norm.weight", (q,), F32),
            (b + "attn_q_b.weight", (q, nh * hd), Q8_0),
            (b + "attn_kv.weight", (H, hd), Q8_0),
            (b + "attn_kv_a_norm.weight", (hd,), F32),
            (b + "attn_output_a.weight", (nh * hd // og, og * ol), Q8_0),
            (b + "attn_output_b.weight", (og * ol, H), Q8_0),
            (b + "hc_attn_fn.weight", (hc * H, mix), F32),
            (b + "hc_ffn_fn.weight", (hc * H, mix), F32),
            (b + "hc_attn_base.weight", (mix,), F32),
            (b + "hc_ffn_base.weight", (mix,), F32),
            (b + "hc_attn_scale.weight", (3,), F32),
            (b + "hc_ffn_scale.weight", (3,), F32),
            (b + "ffn_norm.weight", (H,), F32),
            (b + "ffn_gate_inp.weight", (H, E), BF16),
            (b + "ffn_gate_exps.weight", (H, inter, E), MXFP4),
            (b + "ffn_up_exps.weight", (H, inter, E), MXFP4),
            (b + "ffn_down_exps.weight", (inter, H, E), MXFP4),
            (b + "ffn_gate_shexp.weight", (H, inter * ns), Q8_0),
            (b + "ffn_up_shexp.weight", (H, inter * ns), Q8_0),
            (b + "ffn_down_shexp.weight", (inter * ns, H), Q8_0),
        ]
        if n < c["num_hash_layers"]:
            rows.append((b + "ffn_gate_tid2eid.weight", (k, V), I32))
        else:
            rows.append((b + "exp_probs_b.bias", (E,), F32))
        if r:
            rows += [
                (b + "attn_compressor_kv.weight", (H, coff * hd), BF16),
                (b + "attn_compressor_gate.weight", (H, coff * hd), BF16),
                (b + "attn_compressor_ape.weight", (coff * hd, r), F32),
                (b + "attn_compressor_norm.weight", (hd,), F32),
            ]
        if r == 4:
            rows += [
                (b + "indexer.proj.weight", (H, ih), BF16),
                (b + "indexer.attn_q_b.weight", (q, ih * ihd), Q8_0),
                (b + "indexer_compressor_kv.weight", (H, 2 * ihd), BF16),
                (b + "indexer_compressor_gate.weight", (H, 2 * ihd), BF16),
                (b + "indexer_compressor_ape.weight", (2 * ihd, 4), F32),
                (b + "indexer_compressor_norm.weight", (ihd,), F32),
            ]
    return rows


def flash_config() -> dict:
    config = get_model("deepseek-v4-flash").hf_config()
    assert config["hidden_size"] == 4096
    return config


def test_tiny_specs_match_reference_table() -> None:
    config = get_model("tiny").hf_config()
    got = {s.name: (s.ne, s.ggml_type) for s in gguf_tensor_specs(config)}
    want = {name: (ne, t) for name, ne, t in expected_v4_table(config)}
    assert got == want


def test_flash_and_pro_byte_totals_match_reference() -> None:
    """docs/formats.md §Quantization types: file tensor bytes with the reference type map, no MTP."""
    flash = gguf_tensor_specs(flash_config())
    assert sum(s.nbytes for s in flash) == 156_373_008_732
    assert {s.name: (s.ne, s.ggml_type) for s in flash} == {
        n: (ne, t) for n, ne, t in expected_v4_table(flash_config())
    }
    pro = get_model("deepseek-v4-pro").hf_config()
    assert sum(s.nbytes for s in gguf_tensor_specs(pro)) == 852_158_383_500


def test_metadata_key_types() -> None:
    kv = {key: (value, vtype, sub) for key, value, vtype, sub in gguf_metadata(flash_config())}
    U32, F, A = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.ARRAY
    assert kv["general.architecture"][:2] == ("deepseek4", GGUFValueType.STRING)
    assert kv["deepseek4.expert_gating_func"] == (4, U32, None)
    assert kv["deepseek4.attention.compress_rope_freq_base"] == (160000.0, F, None)
    assert kv["deepseek4.hyper_connection.epsilon"][1] == F
    assert kv["deepseek4.expert_weights_norm"] == (True, GGUFValueType.BOOL, None)
    ratios = kv["deepseek4.attention.compress_ratios"]
    assert ratios[1:] == (A, GGUFValueType.INT32) and len(ratios[0]) == 44
    clamp = kv["deepseek4.swiglu_clamp_exp"]
    assert clamp == ([10.0] * 43, A, F)
    assert kv["deepseek4.hash_layer_count"] == (3, U32, None)
    assert kv["deepseek4.attention.head_count_kv"] == (1, U32, None)
    assert kv["deepseek4.rope.scaling.original_context_length"] == (65536, U32, None)


def test_name_table_drops_on_purpose_and_rejects_unknown() -> None:
    config = get_model("tiny").hf_config()
    facts = {**config, "num_hash_layers": 1, "num_hidden_layers": 4}
    assert gguf_name("layers.0.ffn.experts.7.w2.scale", facts) == "blk.0.ffn_down_exps.weight"
    assert gguf_name("layers.0.ffn.gate.bias", facts) is None  # hash layer: router bias unused
    assert gguf_name("layers.1.ffn.gate.bias", facts) == "blk.1.exp_probs_b.bias"
    assert gguf_name("mtp.0.attn.wq_a.weight", facts) is None
    assert gguf_name("mtp.0.attn.wq_a.weight", facts, mtp=True) == "blk.4.attn_q_a.weight"
    assert gguf_name("mtp.0.e_proj.scale", facts, mtp=True) == "blk.4.nextn.eh_proj.weight"
    assert gguf_name("vision.blocks.0.norm1.weight", facts) is None
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.mystery"):
        gguf_name("layers.0.attn.mystery", facts)


def test_mtp_adds_one_nextn_block() -> None:
    config = get_model("tiny").hf_config()
    names = {s.name for s in gguf_tensor_specs(config, mtp=True)}
    assert {"blk.4.nextn.eh_proj.weight", "blk.4.ffn_gate_exps.weight", "blk.4.exp_probs_b.bias"} <= names
    kv = {k: v for k, v, _, _ in gguf_metadata(config, mtp=True)}
    assert kv["deepseek4.block_count"] == 5 and kv["deepseek4.nextn_predict_layers"] == 1


def test_v41_layout() -> None:
    config = get_model("tiny-v41").hf_config()
    specs = {s.name: s for s in gguf_tensor_specs(config)}
    text = config["text_config"]
    assert specs["blk.1.engram_embd.weight"].ne == (text["engram_head_dim"], text["engram_num_embeddings"][0])
    assert specs["blk.1.engram_q.weight"].ne == (text["hidden_size"], 4)
    assert "output_hc_fn.weight" not in specs and "blk.0.ffn_gate_tid2eid.weight" not in specs
    assert "blk.2.indexer.attn_k.weight" in specs and "blk.3.attn_compressor_kv.weight" not in specs
    kv = {k: v for k, v, _, _ in gguf_metadata(config)}
    assert kv["general.architecture"] == "deepseek41"


def test_recipes_and_fallbacks() -> None:
    config = get_model("tiny").hf_config()
    specs = {s.name: s for s in gguf_tensor_specs(config, experts="q4_k", dense="q4_k")}
    assert specs["blk.0.ffn_gate_exps.weight"].ggml_type == 12  # rows of 256 fit Q4_K
    assert specs["blk.0.attn_q_b.weight"].ggml_type == Q8_0  # q_lora_rank 64 does not: falls back
    assert specs["token_embd.weight"].ggml_type == BF16
    with pytest.raises(UnsupportedError, match="--experts"):
        gguf_tensor_specs(config, experts="q1_0")


def test_bad_configs() -> None:
    config = get_model("tiny").hf_config()
    with pytest.raises(CheckpointError, match="missing key 'hc_eps'"):
        gguf_tensor_specs({k: v for k, v in config.items() if k != "hc_eps"})
    with pytest.raises(UnsupportedError, match="LlamaForCausalLM"):
        gguf_tensor_specs({**config, "architectures": ["LlamaForCausalLM"]})


def test_written_gguf_matches_reference_table(tiny_gguf: Path) -> None:
    """The file itself (not just the plan): names, ggml ne and types as docs/formats.md lists them, nothing extra."""
    got = {t.name: (tuple(int(n) for n in t.shape), int(t.tensor_type)) for t in GGUFReader(tiny_gguf).tensors}
    want = {name: (ne, t) for name, ne, t in expected_v4_table(get_model("tiny").hf_config())}
    assert got == want


@pytest.mark.parametrize("name", ["tiny", "deepseek-v4-flash", "deepseek-v4-pro"])
def test_written_layout_is_the_loader_layout(name: str) -> None:
    """mapping writes exactly the tensors quant.layout says llama.cpp creates (what gguf_check checks)."""
    from quant.config import facts_of
    from quant.layout import model_tensors, nextn_tensors

    config = get_model(name).hf_config()
    facts = facts_of(config)
    ratios = facts["compress_ratios"][: facts["num_hidden_layers"]]
    names = [s.name for s in gguf_tensor_specs(config)]
    assert sorted(names) == sorted(model_tensors(ratios, facts["num_hash_layers"]))
    # --mtp: one more layer with the same trunk plus the block's own tensors (the optional ones or not)
    n = facts["num_hidden_layers"]
    with_mtp = set(model_tensors([*ratios, facts["compress_ratios"][n]], facts["num_hash_layers"]))
    mtp_names = {s.name for s in gguf_tensor_specs(config, mtp=True)}
    assert (
        with_mtp | set(nextn_tensors(n))
        <= mtp_names
        <= with_mtp | set(nextn_tensors(n)) | set(nextn_tensors(n, optional=True))
    )


def test_config_values_are_checked_before_use() -> None:
    config = get_model("tiny").hf_config()
    for key, value, needle in [
        ("num_hidden_layers", 10**9, "num_hidden_layers must be an integer in"),
        ("vocab_size", 0, "vocab_size must be an integer in"),
        ("hidden_size", True, "hidden_size must be an integer"),
        ("rms_norm_eps", "x", "rms_norm_eps must be a finite number"),
        ("compress_ratios", "4", "compress_ratios must be a list"),
        ("o_groups", 3, "o_groups must be a divisor"),
        ("num_experts_per_tok", 10**3, "num_experts_per_tok must be at most"),
        ("rope_scaling", {"type": "yarn"}, "rope_scaling.factor must be a finite number"),
    ]:
        with pytest.raises(CheckpointError, match=needle):
            gguf_tensor_specs({**config, key: value})
