"""Context memory of a deepseek4 model in llama.cpp: the KV cache per layer and the compute buffer.

The KV layout follows `llama_kv_cache_dsv4` in the bundled llama.cpp (docs/formats.md §KV cache), with
`swa_full` off as `dsv4 chat` runs it:

* n_ctx is first padded to a multiple of 256 (llama_context);
* raw sliding-window K cache, every layer: min(n_ctx, pad256(sliding_window + n_ubatch)) cells × head_dim;
* CSA compressed K cache, ratio-4 layers: pad256(ceil(n_ctx / 4)) cells × head_dim;
* HCA compressed K cache, ratio-128 layers: pad256(ceil(n_ctx / 128)) cells × head_dim;
* lightning-indexer K cache, ratio-4 layers: pad256(ceil(n_ctx / 4)) cells × index_head_dim;
* compressor states (always F32, a kv and a score tensor per layer): CSA 8 × 2·head_dim, HCA 128 × head_dim,
  indexer 8 × 2·index_head_dim.

K only (MLA style, no V tensor); a cell costs one row of `kv_type`. V4.1 (`deepseek41`) has no llama.cpp support in
our engine; its cache is our best guess from the checkpoint layout (docs/formats.md §Engram): the raw window on every
layer, a compressed cache on each KV-source layer and an indexer cache on each index-source layer, at that layer's
ratio.

The compute buffer is the peak of llama.cpp's graph allocator (ggml-alloc: tensors freed after their last use,
element-wise ops in place). Without flash attention the peak is inside the attention of a CSA layer
(`build_csa_lid_attention` → `build_attn_mha` in src/models/deepseek4.cpp and src/llama-graph.cpp), with
n_kv = raw window + CSA cells and n_t = n_ubatch tokens. Live at that point:

    scores = n_t · n_head · n_kv · 4          kq, soft-maxed in place
    q      = n_t · n_head · head_dim · 4      the queries and the kqv product, both that size
    stream = n_t · hc · hidden · 4            the hyper-connection residual, its input and output
    x      = n_t · hidden · 4                 the layer input
    per KV cell: the f32 mask rows (raw+CSA concatenated, the top-k mask, the indexer scores: 2.5 · n_t · 4
                 on average) and the concatenated K row (head_dim · 2)
    compute = scores + 2·q + 2·stream + x + n_kv · (2.5 · n_t · 4 + head_dim · 2)

This is within +3 % (never under) of llama.cpp 0.3.36's CPU compute buffer at n_ctx 1k–32k for the tiny model and
a generated model at V4-Flash's widths (bench/plan.py checks it). The output stage needs logits + 2·stream, which
binds only for a large vocab at a short context. With flash attention (the default) there is no scores tensor;
the peak is the larger of two stages, fitted to llama.cpp 0.3.36's CPU compute buffer (bench/plan.py) at n_ctx
1k–32k and n_ubatch 128 and 512: the attention at wide heads (q as above) and the hyper-connection stage at narrow
ones (K rows = n_kv · head_dim · 2):

    compute_fa = max(3.88·q + 1.01·mask, 3.92·stream + 1.46·mask + 2.16·K rows, logits + 2·stream)
                                                                                    (mask = n_t · n_kv · 4)

Within 0.2 % at V4-Flash's widths; on the tiny model from 9 % under to 7 % over (MiB-sized buffers).

GPU backends allocate their own compute buffer per device; the same formula is used for them (unverified here: no
GPU on the calibration machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from quant.archs import ARCHS

CSA_RATIO = 4
HCA_RATIO = 128
CELL_PAD = 256
STATE_ROWS = {CSA_RATIO: 2 * CSA_RATIO, HCA_RATIO: HCA_RATIO}


@dataclass(frozen=True)
class KvType:
    """A KV cache element type: its ggml_type id (llama.cpp's `type_k`/`type_v`) and its block layout."""

    ggml_type: int
    block: int  # values per block
    block_bytes: int


# The cache types dsv4 offers (`--kv-type`, a plan's type_k/type_v), with ggml.h's type ids.
KV_TYPES = {"f16": KvType(1, 1, 2), "q8_0": KvType(8, 32, 34)}
DEFAULT_KV_TYPE = "f16"  # llama.cpp's default cache type

# Flash attention on: weights of (q, mask) in the attention stage, (stream, mask, K rows) in the hyper-connection
# stage; see the module docstring.
COMPUTE_WEIGHTS_FA_ATTN = (3.88, 1.01)
COMPUTE_WEIGHTS_FA_HC = (3.92, 1.46, 2.16)
MASK_ROWS = 2.5  # f32 mask rows per KV cell live at the attention peak (see the module docstring)


def pad(n: int, to: int = CELL_PAD) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class ModelDims:
    """The architecture facts the memory and speed model needs, in config.json terms."""

    arch: str
    n_layer: int
    hidden: int
    n_head: int
    head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    sliding_window: int
    vocab: int
    hc: int
    n_expert: int
    n_expert_used: int
    context_length: int
    compress_ratios: tuple[int, ...]
    kv_source_layers: tuple[int, ...] = ()
    index_source_layers: tuple[int, ...] = ()

    @classmethod
    def from_facts(cls, facts: dict[str, Any], *, arch: str) -> ModelDims:
        n_layer = int(facts["num_hidden_layers"])
        return cls(
            arch=arch,
            n_layer=n_layer,
            hidden=int(facts["hidden_size"]),
            n_head=int(facts["num_attention_heads"]),
            head_dim=int(facts["head_dim"]),
            index_n_heads=int(facts["index_n_heads"]),
            index_head_dim=int(facts["index_head_dim"]),
            index_topk=int(facts["index_topk"]),
            sliding_window=int(facts["sliding_window"]),
            vocab=int(facts["vocab_size"]),
            hc=int(facts.get("hc_mult", 4)),
            n_expert=int(facts["n_routed_experts"]),
            n_expert_used=int(facts["num_experts_per_tok"]),
            context_length=int(facts["max_position_embeddings"]),
            compress_ratios=tuple(int(r) for r in facts["compress_ratios"][:n_layer]),
            kv_source_layers=tuple(int(i) for i in facts.get("kv_source_layer_ids") or ()),
            index_source_layers=tuple(int(i) for i in facts.get("index_source_layer_ids") or ()),
        )


@dataclass(frozen=True)
class KvCache:
    """Bytes of each part of the cache; `per_layer[i]` is what layer i owns (it lives on that layer's device)."""

    n_ctx: int
    raw_cells: int
    csa_cells: int
    hca_cells: int
    raw_bytes: int
    csa_bytes: int
    hca_bytes: int
    indexer_bytes: int
    state_bytes: int
    per_layer: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.raw_bytes + self.csa_bytes + self.hca_bytes + self.indexer_bytes + self.state_bytes


def _row_bytes(width: int, kv_type: str) -> int:
    t = KV_TYPES[kv_type]
    return width // t.block * t.block_bytes


def kv_cache(dims: ModelDims, *, n_ctx: int, n_ubatch: int, kv_type: str = DEFAULT_KV_TYPE) -> KvCache:
    """The cache llama.cpp allocates for one sequence with swa_full off."""
    n_ctx = pad(n_ctx)
    raw_cells = min(n_ctx, pad(dims.sliding_window + n_ubatch))
    k_row = _row_bytes(dims.head_dim, kv_type)
    i_row = _row_bytes(dims.index_head_dim, kv_type)
    parts = {"raw": 0, "csa": 0, "hca": 0, "idx": 0, "state": 0}
    per_layer = []
    for il, ratio in enumerate(dims.compress_ratios):
        layer = {"raw": raw_cells * k_row, "csa": 0, "hca": 0, "idx": 0, "state": 0}
        if ARCHS[dims.arch].kv_by_source_layers:
            if il in dims.kv_source_layers and ratio:
                layer["csa"] = pad(math.ceil(n_ctx / ratio)) * k_row
            if il in dims.index_source_layers and ratio:
                layer["idx"] = pad(math.ceil(n_ctx / ratio)) * i_row
        elif ratio == CSA_RATIO:
            cells = pad(math.ceil(n_ctx / CSA_RATIO))
            layer["csa"] = cells * k_row
            layer["idx"] = cells * i_row
            layer["state"] = 2 * 4 * STATE_ROWS[CSA_RATIO] * 2 * (dims.head_dim + dims.index_head_dim)
        elif ratio == HCA_RATIO:
            layer["hca"] = pad(math.ceil(n_ctx / HCA_RATIO)) * k_row
            layer["state"] = 2 * 4 * STATE_ROWS[HCA_RATIO] * dims.head_dim
        for key, value in layer.items():
            parts[key] += value
        per_layer.append(sum(layer.values()))
    return KvCache(
        n_ctx=n_ctx,
        raw_cells=raw_cells,
        csa_cells=pad(math.ceil(n_ctx / CSA_RATIO)),
        hca_cells=pad(math.ceil(n_ctx / HCA_RATIO)),
        raw_bytes=parts["raw"],
        csa_bytes=parts["csa"],
        hca_bytes=parts["hca"],
        indexer_bytes=parts["idx"],
        state_bytes=parts["state"],
        per_layer=tuple(per_layer),
    )


def compute_buffer_bytes(dims: ModelDims, *, n_ctx: int, n_ubatch: int, flash_attn: bool = False) -> int:
    """llama.cpp's compute buffer for one device (see the module docstring): the attention peak, or the output."""
    cache = kv_cache(dims, n_ctx=n_ctx, n_ubatch=n_ubatch)
    n_kv = cache.raw_cells + (cache.csa_cells if CSA_RATIO in dims.compress_ratios else cache.hca_cells)
    scores = n_ubatch * dims.n_head * n_kv * 4
    mask = n_ubatch * n_kv * 4
    logits = n_ubatch * dims.vocab * 4
    stream = n_ubatch * dims.hc * dims.hidden * 4
    q = n_ubatch * dims.n_head * dims.head_dim * 4
    k_rows = n_kv * dims.head_dim * 2
    if flash_attn:
        (wq, wm), (ws, wm2, wk) = COMPUTE_WEIGHTS_FA_ATTN, COMPUTE_WEIGHTS_FA_HC
        peak = max(wq * q + wm * mask, ws * stream + wm2 * mask + wk * k_rows)
    else:
        cells = MASK_ROWS * mask + k_rows
        peak = scores + 2 * q + 2 * stream + n_ubatch * dims.hidden * 4 + cells
    return int(max(peak, logits + 2 * stream))


def attention_flops(dims: ModelDims, cache: KvCache, *, flash_attn: bool) -> tuple[float, ...]:
    """FLOPs one decoded token spends in each layer's attention and indexer at a full cache.

    llama.cpp's graph attends over every cell of a layer's caches (raw window plus all compressed cells); only the
    flash-attention kernel honours the CSA top-k bound (n_kv_max = sliding_window + index_topk). K doubles as V,
    so each cell costs 2·2·head_dim per head; the indexer scores every CSA cell with index_n_heads heads.
    """
    per_layer = []
    by_ratio = not ARCHS[dims.arch].kv_by_source_layers
    for ratio in dims.compress_ratios:
        cells = cache.raw_cells
        indexer = 0.0
        if by_ratio and ratio == CSA_RATIO:
            cells = min(cells, dims.sliding_window) + dims.index_topk if flash_attn else cells + cache.csa_cells
            indexer = 2.0 * dims.index_n_heads * dims.index_head_dim * cache.csa_cells
        elif by_ratio and ratio == HCA_RATIO:
            cells += cache.hca_cells
        per_layer.append(4.0 * dims.n_head * dims.head_dim * cells + indexer)
    return tuple(per_layer)
