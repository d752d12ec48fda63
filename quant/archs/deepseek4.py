"""DeepSeek V4 (`deepseek4`, DeepseekV4ForCausalLM): what llama.cpp's deepseek4 loader runs.

Tensor names and shapes follow docs/formats.md §Tensor names (llama.cpp's `LLM_ARCH_DEEPSEEK4` and its converter),
in the converter's order; `quant.layout` is the loader's own list, which a test checks these rows against. The
pieces are shared with the families built on V4 (`quant.archs.deepseek41`).
"""

from __future__ import annotations

from quant.archs.base import BF16, CONCAT, DENSE, EXPERTS, F32, I32, Arch, Dims, Row

REQUIRED = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "qk_rope_head_dim",
    "q_lora_rank", "o_lora_rank", "o_groups", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "routed_scaling_factor", "norm_topk_prob", "scoring_func", "index_n_heads",
    "index_head_dim", "index_topk", "sliding_window", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps",
    "rope_theta", "compress_rope_theta", "compress_ratios", "max_position_embeddings", "vocab_size", "swiglu_limit",
)  # fmt: skip

ROOT_TRUNK = (
    Row("token_embd.weight", lambda d: (d.H, d.V), BF16, ("embed.weight",)),
    Row("output_norm.weight", lambda d: (d.H,), F32, ("norm.weight",)),
    Row("output.weight", lambda d: (d.H, d.V), BF16, ("head.weight",)),
)
OUTPUT_HC = (
    Row("output_hc_fn.weight", lambda d: (d.HC * d.H, d.HC), F32, ("hc_head_fn",)),
    Row("output_hc_base.weight", lambda d: (d.HC,), F32, ("hc_head_base",)),
    Row("output_hc_scale.weight", lambda d: (1,), F32, ("hc_head_scale",)),
)
ATTENTION = (
    Row("attn_norm.weight", lambda d: (d.H,), F32, ("attn_norm.weight",)),
    Row("attn_sinks.weight", lambda d: (d.nh,), F32, ("attn.attn_sink",)),
    Row("attn_q_a.weight", lambda d: (d.H, d.q), DENSE, ("attn.wq_a.weight",)),
    Row("attn_q_a_norm.weight", lambda d: (d.q,), F32, ("attn.q_norm.weight",)),
    Row("attn_q_b.weight", lambda d: (d.q, d.nh * d.hd), DENSE, ("attn.wq_b.weight",)),
    Row("attn_kv.weight", lambda d: (d.H, d.hd), DENSE, ("attn.wkv.weight",)),
    Row("attn_kv_a_norm.weight", lambda d: (d.hd,), F32, ("attn.kv_norm.weight",)),
    Row("attn_output_a.weight", lambda d: (d.nh * d.hd // d.og, d.og * d.ol), DENSE, ("attn.wo_a.weight",)),
    Row("attn_output_b.weight", lambda d: (d.og * d.ol, d.H), DENSE, ("attn.wo_b.weight",)),
    *(
        Row(f"hc_{part}_{name}.weight", shape, F32, (f"hc_{part}_{name}",))
        for part in ("attn", "ffn")
        for name, shape in (
            ("fn", lambda d: (d.HC * d.H, d.mix)),
            ("base", lambda d: (d.mix,)),
            ("scale", lambda d: (3,)),
        )
    ),
)


def _coff(ratio: int) -> int:
    """Ratio-4 (CSA) compressors have two overlapping windows, so twice the width."""
    return 2 if ratio == 4 else 1


def _kv_width(d: Dims) -> tuple[int, int]:
    return (d.H, _coff(d.r) * d.hd)


def _index_width(d: Dims) -> tuple[int, int]:
    return (d.H, 2 * d.ihd)


def compressed(d: Dims) -> bool:
    return d.r > 0


def csa(d: Dims) -> bool:
    return d.r == 4


def mtp(d: Dims) -> bool:
    return d.nextn


# The compressor of every compressed layer, and the lightning indexer of the ratio-4 ones.
COMPRESSOR = (
    Row("attn_compressor_kv.weight", _kv_width, BF16, ("attn.compressor.wkv.weight",), compressed),
    Row("attn_compressor_gate.weight", _kv_width, BF16, ("attn.compressor.wgate.weight",), compressed),
    Row("attn_compressor_ape.weight", lambda d: (_coff(d.r) * d.hd, d.r), F32, ("attn.compressor.ape",), compressed),
    Row("attn_compressor_norm.weight", lambda d: (d.hd,), F32, ("attn.compressor.norm.weight",), compressed),
    Row("indexer.proj.weight", lambda d: (d.H, d.ih), BF16, ("attn.indexer.weights_proj.weight",), csa),
    Row("indexer.attn_q_b.weight", lambda d: (d.q, d.ih * d.ihd), DENSE, ("attn.indexer.wq_b.weight",), csa),
    Row("indexer_compressor_kv.weight", _index_width, BF16, ("attn.indexer.compressor.wkv.weight",), csa),
    Row("indexer_compressor_gate.weight", _index_width, BF16, ("attn.indexer.compressor.wgate.weight",), csa),
    Row("indexer_compressor_ape.weight", lambda d: (2 * d.ihd, 4), F32, ("attn.indexer.compressor.ape",), csa),
    Row("indexer_compressor_norm.weight", lambda d: (d.ihd,), F32, ("attn.indexer.compressor.norm.weight",), csa),
)  # fmt: skip
FFN = (
    Row("ffn_norm.weight", lambda d: (d.H,), F32, ("ffn_norm.weight",)),
    Row("ffn_gate_inp.weight", lambda d: (d.H, d.E), BF16, ("ffn.gate.weight",)),
    Row("ffn_gate_tid2eid.weight", lambda d: (d.k, d.V), I32, ("ffn.gate.tid2eid",), lambda d: d.hash),
    Row("exp_probs_b.bias", lambda d: (d.E,), F32, ("ffn.gate.bias",), lambda d: not d.hash),
    Row("ffn_gate_exps.weight", lambda d: (d.H, d.inter, d.E), EXPERTS, ("ffn.experts.{expert}.w1.weight",)),
    Row("ffn_up_exps.weight", lambda d: (d.H, d.inter, d.E), EXPERTS, ("ffn.experts.{expert}.w3.weight",)),
    Row("ffn_down_exps.weight", lambda d: (d.inter, d.H, d.E), EXPERTS, ("ffn.experts.{expert}.w2.weight",)),
    Row("ffn_gate_shexp.weight", lambda d: (d.H, d.inter * d.ns), DENSE, ("ffn.shared_experts.w1.weight",)),
    Row("ffn_up_shexp.weight", lambda d: (d.H, d.inter * d.ns), DENSE, ("ffn.shared_experts.w3.weight",)),
    Row("ffn_down_shexp.weight", lambda d: (d.inter * d.ns, d.H), DENSE, ("ffn.shared_experts.w2.weight",)),
)
# The MTP block of an --mtp GGUF: the layer after the main ones, with the trunk above plus these.
NEXTN = (
    Row("nextn.eh_proj.weight", lambda d: (2 * d.H, d.H), CONCAT, ("e_proj.weight", "h_proj.weight"), mtp),
    Row("nextn.enorm.weight", lambda d: (d.H,), F32, ("enorm.weight",), mtp),
    Row("nextn.hnorm.weight", lambda d: (d.H,), F32, ("hnorm.weight",), mtp),
    Row("nextn.shared_head_norm.weight", lambda d: (d.H,), F32, ("norm.weight",), mtp),
)  # fmt: skip

ARCH = Arch(
    name="deepseek4",
    title="DeepSeek V4",
    hf_class="DeepseekV4ForCausalLM",
    model_type="deepseek_v4",
    required=REQUIRED,
    root=ROOT_TRUNK + OUTPUT_HC,
    block=ATTENTION + COMPRESSOR + FFN + NEXTN,
)
