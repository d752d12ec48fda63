"""Write the built-in tiny checkpoints offline, in exactly the official Hugging Face layout.

The tiny models let the whole pipeline (pull -> quantize -> run) work without network: same file set, shard
scheme, tensor names, dtypes and packing as the releases (docs/formats.md §Checkpoints), with random weights small
enough for llama.cpp to run without NaN. Every tensor's values come from an RNG seeded by its name, so two runs
write byte-identical files.
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsv4cli.errors import RegistryError
from dsv4cli.models.registry import ModelSpec
from dsv4cli.models.tiny_tokenizer import tokenizer_files
from quant.archs import deepseek41
from quant.codecs import f32_to_bf16, quantize_fp4_e2m1, quantize_fp8_block
from quant.safetensors import DTYPES, write_safetensors

MAX_PARAMS = 1 << 28  # ~0.5 GB of BF16: the largest built-in test model is a few million
SEED = 20260424  # the V4-Flash release date; any constant keeps the output stable
PROJ_STD = 0.02
GENERATION_CONFIG = {
    "bos_token_id": 0,
    "eos_token_id": 1,
    "do_sample": True,
    "temperature": 1.0,
    "top_p": 1.0,
    "transformers_version": "4.46.3",
}

Tensors = dict[str, tuple[str, np.ndarray]]


def _rng(name: str) -> np.random.Generator:
    """A generator that depends only on the tensor name (crc32 is stable across runs, unlike hash())."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode("utf-8"))])


def _normal(name: str, shape: tuple[int, ...], *, std: float, mean: float = 0.0) -> np.ndarray:
    return _rng(name).standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean)


@dataclass(frozen=True)
class _Shapes:
    """The dimensions the tensor inventory is written in (docs/formats.md §Checkpoint layout)."""

    hidden: int
    vocab: int
    heads: int
    head_dim: int
    q_rank: int
    o_groups: int
    o_rank: int
    experts: int
    inter: int
    shared: int
    top_k: int
    index_heads: int
    index_dim: int
    hc: int
    block: int

    @classmethod
    def of(cls, facts: dict[str, Any]) -> _Shapes:
        return cls(
            hidden=facts["hidden_size"],
            vocab=facts["vocab_size"],
            heads=facts["num_attention_heads"],
            head_dim=facts["head_dim"],
            q_rank=facts["q_lora_rank"],
            o_groups=facts["o_groups"],
            o_rank=facts["o_lora_rank"],
            experts=facts["n_routed_experts"],
            inter=facts["moe_intermediate_size"],
            shared=facts["n_shared_experts"],
            top_k=facts["num_experts_per_tok"],
            index_heads=facts["index_n_heads"],
            index_dim=facts["index_head_dim"],
            hc=facts["hc_mult"],
            block=facts.get("weight_block_size", 128),
        )

    @property
    def mix(self) -> int:
        return (2 + self.hc) * self.hc


class _Builder:
    """Collects one shard's tensors in the released dtypes and packing."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.tensors: Tensors = {}

    def bf16(self, name: str, shape: tuple[int, ...], *, std: float = PROJ_STD, mean: float = 0.0) -> None:
        self.tensors[name] = ("BF16", f32_to_bf16(_normal(name, shape, std=std, mean=mean)))

    def norm(self, name: str, size: int) -> None:
        self.bf16(name, (size,), std=0.02, mean=1.0)

    def f32(self, name: str, shape: tuple[int, ...], *, std: float = PROJ_STD, mean: float = 0.0) -> None:
        self.tensors[name] = ("F32", _normal(name, shape, std=std, mean=mean))

    def fp8(
        self, stem: str, shape: tuple[int, int], *, block: int | tuple[int, int] | None = None, std: float = PROJ_STD
    ) -> None:
        weight, scale = quantize_fp8_block(_normal(stem, shape, std=std), self.block if block is None else block)
        self.tensors[f"{stem}.weight"] = ("F8_E4M3", weight)
        self.tensors[f"{stem}.scale"] = ("F8_E8M0", scale)

    def fp4(self, stem: str, shape: tuple[int, int], *, std: float = PROJ_STD) -> None:
        packed, scale = quantize_fp4_e2m1(_normal(stem, shape, std=std))
        self.tensors[f"{stem}.weight"] = ("I8", packed)
        self.tensors[f"{stem}.scale"] = ("F8_E8M0", scale)

    def tid2eid(self, name: str, vocab: int, experts: int, top_k: int) -> None:
        """Hash routing table: `top_k` distinct experts per token id."""
        order = np.argsort(_rng(name).random((vocab, experts)), axis=1)
        self.tensors[name] = ("I64", order[:, :top_k].astype(np.int64))


def _block(
    b: _Builder, p: str, s: _Shapes, facts: dict[str, Any], *, layer: int, ratio: int, v41: bool, gain: float = 1.0
) -> None:
    """One transformer block (main layer or MTP stage) with prefix `p` (docs/formats.md §Checkpoint layout); `gain`
    scales the projections that write into the residual stream (attention output, shared and routed down)."""
    out_std = PROJ_STD * gain
    b.norm(f"{p}attn_norm.weight", s.hidden)
    b.norm(f"{p}ffn_norm.weight", s.hidden)
    b.f32(f"{p}attn.attn_sink", (s.heads,))
    b.norm(f"{p}attn.q_norm.weight", s.q_rank)
    b.norm(f"{p}attn.kv_norm.weight", s.head_dim)
    b.fp8(f"{p}attn.wq_a", (s.q_rank, s.hidden))
    b.fp8(f"{p}attn.wq_b", (s.heads * s.head_dim, s.q_rank))
    b.fp8(f"{p}attn.wkv", (s.head_dim, s.hidden))
    b.fp8(f"{p}attn.wo_a", (s.o_groups * s.o_rank, s.heads * s.head_dim // s.o_groups))
    b.fp8(f"{p}attn.wo_b", (s.hidden, s.o_groups * s.o_rank), std=out_std)
    for sub in ("attn", "ffn"):
        b.f32(f"{p}hc_{sub}_fn", (s.mix, s.hc * s.hidden))
        b.f32(f"{p}hc_{sub}_base", (s.mix,), std=0.1)
        b.f32(f"{p}hc_{sub}_scale", (3,), std=0.02, mean=1.0)
    b.bf16(f"{p}ffn.gate.weight", (s.experts, s.hidden))
    if not v41 and layer < facts["num_hash_layers"]:
        b.tid2eid(f"{p}ffn.gate.tid2eid", s.vocab, s.experts, s.top_k)
    else:
        b.f32(f"{p}ffn.gate.bias", (s.experts,), std=0.0)
    shared = s.inter * s.shared
    b.fp8(f"{p}ffn.shared_experts.w1", (shared, s.hidden))
    b.fp8(f"{p}ffn.shared_experts.w2", (s.hidden, shared), std=out_std)
    b.fp8(f"{p}ffn.shared_experts.w3", (shared, s.hidden))
    expert = b.fp4 if facts["expert_dtype"] == "fp4" else b.fp8
    for e in range(s.experts):
        expert(f"{p}ffn.experts.{e}.w1", (s.inter, s.hidden))
        expert(f"{p}ffn.experts.{e}.w2", (s.hidden, s.inter), std=out_std)
        expert(f"{p}ffn.experts.{e}.w3", (s.inter, s.hidden))
    if v41:
        _v41_attention_extras(b, p, s, facts, layer=layer, ratio=ratio)
    elif ratio:
        coff = 2 if ratio == 4 else 1
        _v4_compressor(b, f"{p}attn.compressor", s, ratio=ratio, width=coff * s.head_dim, norm=s.head_dim)
        if ratio == 4:
            b.fp8(f"{p}attn.indexer.wq_b", (s.index_heads * s.index_dim, s.q_rank))
            b.bf16(f"{p}attn.indexer.weights_proj.weight", (s.index_heads, s.hidden))
            _v4_compressor(b, f"{p}attn.indexer.compressor", s, ratio=4, width=2 * s.index_dim, norm=s.index_dim)


def _v4_compressor(b: _Builder, p: str, s: _Shapes, *, ratio: int, width: int, norm: int) -> None:
    b.f32(f"{p}.ape", (ratio, width))
    b.bf16(f"{p}.wkv.weight", (width, s.hidden))
    b.bf16(f"{p}.wgate.weight", (width, s.hidden))
    b.norm(f"{p}.norm.weight", norm)


def _v41_attention_extras(b: _Builder, p: str, s: _Shapes, facts: dict[str, Any], *, layer: int, ratio: int) -> None:
    """V4.1: compressor on KV-source layers, indexer on index-source layers, Engram (docs/formats.md §Engram)."""
    if layer in facts["kv_source_layer_ids"]:
        b.bf16(f"{p}attn.compressor.wkv.weight", (s.head_dim, s.hidden))
        b.norm(f"{p}attn.compressor.norm.weight", s.head_dim)
        if ratio > 1:
            b.bf16(f"{p}attn.compressor.wgate.weight", (s.head_dim, s.hidden))
        b.bf16(f"{p}attn.indexer.wk.weight", (s.index_dim, s.head_dim))
        b.norm(f"{p}attn.indexer.k_norm.weight", s.index_dim)
    if layer in facts["index_source_layer_ids"]:
        b.fp8(f"{p}attn.indexer.wq_b", (s.index_heads * s.index_dim, s.q_rank))
        b.bf16(f"{p}attn.indexer.weights_proj.weight", (s.index_heads, s.hidden))
    if layer in facts["engram_layer_ids"]:
        n_grams = (facts["engram_max_ngram_size"] - 1) * facts["engram_n_heads"]
        b.fp8(f"{p}engram.wkv", (s.hidden * (s.hc + 1), n_grams * facts["engram_head_dim"]))
        b.f32(f"{p}engram.q_weight", (s.hc, s.hidden), std=0.02, mean=1.0)
        b.f32(f"{p}engram.k_weight", (s.hc, s.hidden), std=0.02, mean=1.0)


def _mtp_extras(b: _Builder, p: str, s: _Shapes) -> None:
    b.fp8(f"{p}e_proj", (s.hidden, s.hidden))
    b.fp8(f"{p}h_proj", (s.hidden, s.hidden))
    for name in ("enorm", "hnorm", "norm"):
        b.norm(f"{p}{name}.weight", s.hidden)
    _hc_head(b, p, s)


def _hc_head(b: _Builder, p: str, s: _Shapes) -> None:
    b.f32(f"{p}hc_head_fn", (s.hc, s.hc * s.hidden))
    b.f32(f"{p}hc_head_base", (s.hc,), std=0.1)
    b.f32(f"{p}hc_head_scale", (1,), std=0.02, mean=1.0)


def _check_size(spec: ModelSpec, facts: dict[str, Any], s: _Shapes, max_params: int) -> None:
    """Refuse a built-in entry whose dimensions would write more than MAX_PARAMS weights: the built-in models are
    test models, and a models.toml entry with real (or absurd) dimensions must not fill memory and disk."""
    layers = facts["num_hidden_layers"] + facts["num_nextn_predict_layers"]
    attention = s.hidden * s.q_rank + s.q_rank * s.heads * s.head_dim + s.heads * s.head_dim * s.o_rank
    attention += s.o_groups * s.o_rank * s.hidden + s.q_rank * s.index_heads * s.index_dim + s.hidden * s.head_dim
    experts = (s.experts + s.shared) * 3 * s.hidden * s.inter
    engram = sum(facts["engram_num_embeddings"]) * facts["engram_head_dim"] if spec.arch == deepseek41.ARCH.name else 0
    total = 2 * s.vocab * s.hidden + layers * (attention + experts) + engram
    if total > max_params:
        raise RegistryError(
            f"model {spec.name!r}: a built-in model of about {total:,} weights is too large to write "
            f"(at most {max_params:,}: built-in models are small test models)",
            hint="shrink the entry's [config] dimensions, or give it a Hub repo instead of builtin = true",
        )


def _shards(spec: ModelSpec, max_params: int | None, gains: tuple[float, ...]) -> list[Tensors]:
    """Shard contents in release order: embed, one per layer, head/norm, MTP stages, then (V4.1) vision, Engram."""
    facts = {**spec.facts, "expert_dtype": spec.expert_dtype}
    s = _Shapes.of(facts)
    if max_params is not None:
        _check_size(spec, facts, s, max_params)
    v41 = spec.arch == deepseek41.ARCH.name
    n_layers, ratios = facts["num_hidden_layers"], facts["compress_ratios"]
    shards: list[_Builder] = []

    def new_shard() -> _Builder:
        shards.append(_Builder(s.block))
        return shards[-1]

    new_shard().bf16("embed.weight", (s.vocab, s.hidden))
    for layer in range(n_layers):
        gain = gains[layer] if layer < len(gains) else 1.0
        _block(new_shard(), f"layers.{layer}.", s, facts, layer=layer, ratio=ratios[layer], v41=v41, gain=gain)
    head = new_shard()
    head.bf16("head.weight", (s.vocab, s.hidden))
    head.norm("norm.weight", s.hidden)
    if not v41:
        _hc_head(head, "", s)
    for stage in range(facts["num_nextn_predict_layers"]):
        mtp = new_shard()
        _block(mtp, f"mtp.{stage}.", s, facts, layer=n_layers + stage, ratio=ratios[n_layers + stage], v41=v41)
        _mtp_extras(mtp, f"mtp.{stage}.", s)
    if v41:
        vision = new_shard()
        vision.bf16("vision.patch_embed.weight", (32, 3 * 14 * 14))
        vision.norm("vision.blocks.0.norm1.weight", 32)
        for layer, rows in zip(facts["engram_layer_ids"], facts["engram_num_embeddings"], strict=True):
            # one E8M0 scale per 32 columns of each row (rows are not tiled): a 1x32 block grid
            new_shard().fp8(f"layers.{layer}.engram.embed", (rows, facts["engram_head_dim"]), block=(1, 32))
    return [shard.tensors for shard in shards]


def _ordered(tensors: Tensors) -> Tensors:
    """The safetensors library's order: widest dtype first (keeps data aligned), then by name."""
    return dict(sorted(tensors.items(), key=lambda item: (-DTYPES[item[1][0]].itemsize, item[0])))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_checkpoint(
    spec: ModelSpec, folder: Path, *, max_params: int | None = MAX_PARAMS, layer_gains: tuple[float, ...] = ()
) -> None:
    """Write `spec`'s checkpoint into `folder` (replacing it); nothing appears under `folder` until complete.

    `max_params` guards registry entries (a models.toml entry must not fill memory and disk); the benchmarks pass
    None to generate models at V4-Flash's real widths on purpose. `layer_gains[N]` scales what layer N writes into
    the residual stream (default 1), so that layers differ in how much they matter (bench/fit.py)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_files(spec, staging, max_params, layer_gains)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        retired = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        folder.rename(retired)
        staging.rename(folder)
        shutil.rmtree(retired)
    else:
        staging.rename(folder)


def _write_files(spec: ModelSpec, staging: Path, max_params: int | None, gains: tuple[float, ...]) -> None:
    shards = _shards(spec, max_params, gains)
    weight_map: dict[str, str] = {}
    total = 0
    for number, tensors in enumerate(shards, start=1):
        shard_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(staging / shard_name, _ordered(tensors))
        weight_map.update(dict.fromkeys(tensors, shard_name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(staging / "model.safetensors.index.json", index)
    _write_json(staging / "config.json", spec.hf_config())
    _write_json(staging / "generation_config.json", GENERATION_CONFIG)
    facts = spec.facts
    for name, data in tokenizer_files(facts["vocab_size"], model_max_length=facts["max_position_embeddings"]).items():
        _write_json(staging / name, data)
