"""The deepseek4 GGUF tensor layout as llama.cpp's loader creates it: root tensors and, per block, the tensors
every layer has plus those that depend on its compress ratio (src/llama-model.cpp, LLM_ARCH_DEEPSEEK4).

`quant.mapping` writes this layout (a test checks that its plan for a V4 config yields exactly these names) and
`dsv4cli.gguf_io.check` checks a GGUF against it before llama.cpp sees the file.
"""

from __future__ import annotations

ROOT_TENSORS = (
    "token_embd.weight",
    "output_norm.weight",
    "output.weight",
    "output_hc_fn.weight",
    "output_hc_base.weight",
    "output_hc_scale.weight",
)
# Names without `blk.N.` and `.weight`.
EVERY_LAYER = (
    "attn_norm", "attn_sinks", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv", "attn_kv_a_norm",
    "attn_output_a", "attn_output_b", "hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base",
    "hc_ffn_scale", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp",
    "ffn_up_shexp", "ffn_down_shexp",
)  # fmt: skip
COMPRESSED = ("attn_compressor_kv", "attn_compressor_gate", "attn_compressor_ape", "attn_compressor_norm")
INDEXED = (
    "indexer.proj",
    "indexer.attn_q_b",
    "indexer_compressor_kv",
    "indexer_compressor_gate",
    "indexer_compressor_ape",
    "indexer_compressor_norm",
)

# The MTP (nextn) block of an `--mtp` GGUF: its layer (numbered after the main layers and counted in block_count)
# has the tensors above plus these; llama.cpp creates them for layers past the main model (src/models/deepseek4.cpp).
NEXTN = ("nextn.eh_proj", "nextn.enorm", "nextn.hnorm")
NEXTN_OPTIONAL = ("nextn.embed_tokens", "nextn.shared_head_head", "nextn.shared_head_norm")


def layer_tensors(layer: int, ratio: int, *, hash_layer: bool) -> list[str]:
    """Full GGUF names of block `layer` with this compress ratio; hash layers route by a token table
    (`ffn_gate_tid2eid`) instead of a bias (`exp_probs_b`)."""
    names = EVERY_LAYER + (COMPRESSED if ratio else ()) + (INDEXED if ratio == 4 else ())
    router = "ffn_gate_tid2eid.weight" if hash_layer else "exp_probs_b.bias"
    return [f"blk.{layer}.{n}.weight" for n in names] + [f"blk.{layer}.{router}"]


def nextn_tensors(layer: int, *, optional: bool = False) -> list[str]:
    """Full GGUF names of the MTP block's own tensors in `layer`: the required ones, or those llama.cpp may skip."""
    return [f"blk.{layer}.{n}.weight" for n in (NEXTN_OPTIONAL if optional else NEXTN)]


def model_tensors(ratios: list[int], n_hash: int) -> list[str]:
    """Every tensor name a deepseek4 main model (no MTP block) has, for these per-layer compress ratios."""
    names = list(ROOT_TENSORS)
    for layer, ratio in enumerate(ratios):
        names += layer_tensors(layer, ratio, hash_layer=layer < n_hash)
    return names
