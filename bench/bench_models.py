"""Generated models the benchmarks share: a checkpoint at V4-Flash's real widths, converted once and kept.

Imported by the bench scripts (run as `python bench/NAME.py`, which puts this folder on `sys.path`).
"""

from __future__ import annotations

from pathlib import Path

# V4-Flash's real widths (docs/formats.md), 3 layers and 8 experts: ~0.5 GB, the memory and speed of one real layer.
REAL_CONFIG = {
    "hidden_size": 4096,
    "num_hidden_layers": 3,
    "num_attention_heads": 64,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "o_lora_rank": 1024,
    "o_groups": 8,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 8,
    "num_experts_per_tok": 6,
    "vocab_size": 512,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "sliding_window": 128,
    "num_hash_layers": 1,
    "max_position_embeddings": 65536,
    "compress_ratios": [0, 4, 128, 0],
}


def make_gguf(folder: Path, name: str, config: dict) -> Path:
    """A generated checkpoint with `config`, converted with the default recipe (kept in `folder` once written)."""
    from dsv4cli.models.registry import ModelSpec
    from dsv4cli.models.tiny import write_tiny_checkpoint
    from quant.convert import QuantOptions, quantize_checkpoint

    out = folder / f"{name}.gguf"
    if out.is_file():
        return out
    write_tiny_checkpoint(ModelSpec(name=name, builtin=True, config=config), folder / name, max_params=None)
    quantize_checkpoint(folder / name, out, QuantOptions())
    return out
