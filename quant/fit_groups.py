"""The tensor groups a fitted quant (`dsv4 quantize --size`) chooses one type for: the routed experts of each layer
("experts.N"), all attention projections ("attention"), the shared experts ("shared"), the token embeddings
("embeddings") and the output head ("output"). Other tensors (norms, routers, hyper-connections, compressors) keep
the layout's type: they are small and read once per token.
"""

from __future__ import annotations

import re

_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_SHARED = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_shexp\.weight$")
_ATTENTION = re.compile(r"^blk\.\d+\.(attn_(q_a|q_b|kv|output_a|output_b)|indexer\.attn_q_b)\.weight$")
ROOT = {"token_embd.weight": "embeddings", "output.weight": "output"}


def fit_group(name: str) -> str | None:
    """The group of GGUF tensor `name`, or None when a fitted quant leaves its type alone."""
    m = _EXPERTS.match(name)
    if m:
        return f"experts.{m.group(1)}"
    if _SHARED.match(name):
        return "shared"
    if _ATTENTION.match(name):
        return "attention"
    return ROOT.get(name)
