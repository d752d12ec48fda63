"""The tensor groups a fitted quant (`dsv4 quantize --size`) chooses one type for, per layer N: the routed experts
("experts.N"), the attention projections and the indexer's query projections ("attention.N"), the shared expert
("shared.N"), the KV compressors of compressed layers and of the indexer ("compressors.N"), the hyper-connection
mixers ("hyper.N"); and once: the token embeddings ("embeddings") and the output head with its mixer ("output").
Everything else (norms, routers, biases, compressor position terms, hash tables) keeps the layout's type: they are
small, and some are not matrices llama.cpp multiplies.
"""

from __future__ import annotations

import re

_KINDS = (
    ("experts", re.compile(r"ffn_(gate|up|down)_exps")),
    ("shared", re.compile(r"ffn_(gate|up|down)_shexp")),
    ("attention", re.compile(r"attn_(q_a|q_b|kv|output_a|output_b)|indexer\.(attn_q_b|proj)")),
    ("compressors", re.compile(r"(attn|indexer)_compressor_(kv|gate)")),
    ("hyper", re.compile(r"hc_(attn|ffn)_fn")),
)
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")
ROOT = {"token_embd.weight": "embeddings", "output.weight": "output", "output_hc_fn.weight": "output"}
KEEP = "kept"  # a group's choice when it keeps the lossless conversion's types (BF16/F32 where the layout has them)


def fit_group(name: str) -> str | None:
    """The group of GGUF tensor `name`, or None when a fitted quant leaves its type alone."""
    m = _BLOCK.match(name)
    if m is None:
        return ROOT.get(name)
    for kind, pattern in _KINDS:
        if pattern.fullmatch(m.group(2)):
            return f"{kind}.{m.group(1)}"
    return None


def group_kind(group: str) -> str:
    """ "experts" for "experts.7": the kind of tensor a group holds, which decides the types it may take."""
    return group.split(".")[0]


_ATTENTION_INPUT = re.compile(
    r"attn_(q_a|q_b|kv|output_a)|indexer\.(attn_q_b|proj)|(attn|indexer)_compressor_(kv|gate)"
)
_FFN_INPUT = re.compile(r"ffn_(gate|up)_(exps|shexp)")
ATTENTION_OUT, FFN_OUT = "attn_output_b", ("ffn_down_shexp", "ffn_down_exps")  # what a layer adds to the stream


def writer_of(name: str) -> str:
    """The projection that carries tensor `name`'s error into the residual stream (`quant.importance` states every
    loss in the stream's unit): the attention output for the attention's inputs, compressors and indexer; the down
    projection for the gate and up of the routed and shared experts; `name` itself for those writers and for the
    tensors outside a block path (hyper-connection mixers, embeddings, head)."""
    m = _BLOCK.match(name)
    if m is None:
        return name
    layer, rest = m.group(1), m.group(2)
    if _ATTENTION_INPUT.fullmatch(rest):
        return f"blk.{layer}.{ATTENTION_OUT}.weight"
    found = _FFN_INPUT.fullmatch(rest)
    if found:
        return f"blk.{layer}.{FFN_OUT[0] if found.group(2) == 'shexp' else FFN_OUT[1]}.weight"
    return name
