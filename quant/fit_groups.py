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


ATTENTION_OUT, FFN_OUT = "attn_output_b", ("ffn_down_shexp", "ffn_down_exps")  # what a layer adds to the stream


def writer_of(name: str) -> str:
    """The projection that carries tensor `name`'s error into the residual stream (`quant.importance` states every
    loss in the stream's unit): the attention output for the attention's inputs, compressors and indexer; the down
    projection for the gate and up of the routed and shared experts; `name` itself for those writers and for the
    tensors outside a block path (hyper-connection mixers, embeddings, head)."""
    group = fit_group(name) or ""
    kind = group_kind(group)
    if kind in ("attention", "compressors"):
        writer = ATTENTION_OUT
    elif kind in ("shared", "experts"):
        writer = FFN_OUT[kind == "experts"]
    else:
        return name
    return f"blk.{group.split('.')[1]}.{writer}.weight"
