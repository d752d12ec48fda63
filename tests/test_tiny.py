"""The built-in tiny checkpoints follow the official layout (docs/formats.md §Checkpoints) and are reproducible."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dsv4cli.models.registry import ModelSpec, get_model
from dsv4cli.models.tiny import write_tiny_checkpoint
from quant.codecs import bf16_to_f32, dequant_fp8_block, fp4_e2m1_to_f32
from quant.safetensors import read_header

SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
FF, PIPE = "\uff5c", "\u2581"  # the fullwidth bar and lower-one-eighth block of DeepSeek special tokens


def ceil(a: int, b: int) -> int:
    return -(-a // b)


def expected_inventory(config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) computed from config.json alone, following the reference tables."""
    v41 = config["model_type"] == "deepseek_v41"
    c = config["text_config"] if v41 else config
    quant = config["quantization_config"]
    blk = quant["weight_block_size"][0]
    fp4 = (quant.get("expert_dtype") if v41 else config.get("expert_dtype")) == "fp4"
    H, V, nh, hd = c["hidden_size"], c["vocab_size"], c["num_attention_heads"], c["head_dim"]
    q, og, ol, E, inter, hc = (
        c["q_lora_rank"],
        c["o_groups"],
        c["o_lora_rank"],
        c["n_routed_experts"],
        c["moe_intermediate_size"],
        c["hc_mult"],
    )
    ih, ihd, k, mix = c["index_n_heads"], c["index_head_dim"], c["num_experts_per_tok"], (2 + hc) * hc
    inv: dict[str, tuple[str, tuple[int, ...]]] = {}

    def fp8(name: str, rows: int, cols: int) -> None:
        inv[f"{name}.weight"] = ("F8_E4M3", (rows, cols))
        inv[f"{name}.scale"] = ("F8_E8M0", (ceil(rows, blk), ceil(cols, blk)))

    def expert(name: str, rows: int, cols: int) -> None:
        if fp4:
            inv[f"{name}.weight"] = ("I8", (rows, cols // 2))
            inv[f"{name}.scale"] = ("F8_E8M0", (rows, cols // 32))
        else:
            fp8(name, rows, cols)

    def hc_head(p: str) -> None:
        inv[f"{p}hc_head_fn"] = ("F32", (hc, hc * H))
        inv[f"{p}hc_head_base"] = ("F32", (hc,))
        inv[f"{p}hc_head_scale"] = ("F32", (1,))

    def block(p: str, layer: int, ratio: int) -> None:
        for n, size in (("attn_norm", H), ("ffn_norm", H), ("attn.q_norm", q), ("attn.kv_norm", hd)):
            inv[f"{p}{n}.weight"] = ("BF16", (size,))
        inv[f"{p}attn.attn_sink"] = ("F32", (nh,))
        fp8(f"{p}attn.wq_a", q, H)
        fp8(f"{p}attn.wq_b", nh * hd, q)
        fp8(f"{p}attn.wkv", hd, H)
        fp8(f"{p}attn.wo_a", og * ol, nh * hd // og)
        fp8(f"{p}attn.wo_b", H, og * ol)
        for part in ("attn", "ffn"):
            inv[f"{p}hc_{part}_fn"] = ("F32", (mix, hc * H))
            inv[f"{p}hc_{part}_base"] = ("F32", (mix,))
            inv[f"{p}hc_{part}_scale"] = ("F32", (3,))
        inv[f"{p}ffn.gate.weight"] = ("BF16", (E, H))
        if not v41 and layer < c["num_hash_layers"]:
            inv[f"{p}ffn.gate.tid2eid"] = ("I64", (V, k))
        else:
            inv[f"{p}ffn.gate.bias"] = ("F32", (E,))
        fp8(f"{p}ffn.shared_experts.w1", inter, H)
        fp8(f"{p}ffn.shared_experts.w3", inter, H)
        fp8(f"{p}ffn.shared_experts.w2", H, inter)
        for e in range(E):
            expert(f"{p}ffn.experts.{e}.w1", inter, H)
            expert(f"{p}ffn.experts.{e}.w3", inter, H)
            expert(f"{p}ffn.experts.{e}.w2", H, inter)
        if v41:
            if layer in c["kv_source_layer_ids"]:
                inv[f"{p}attn.compressor.wkv.weight"] = ("BF16", (hd, H))
                inv[f"{p}attn.compressor.norm.weight"] = ("BF16", (hd,))
                if ratio > 1:
                    inv[f"{p}attn.compressor.wgate.weight"] = ("BF16", (hd, H))
                inv[f"{p}attn.indexer.wk.weight"] = ("BF16", (ihd, hd))
                inv[f"{p}attn.indexer.k_norm.weight"] = ("BF16", (ihd,))
            if layer in c["index_source_layer_ids"]:
                fp8(f"{p}attn.indexer.wq_b", ih * ihd, q)
                inv[f"{p}attn.indexer.weights_proj.weight"] = ("BF16", (ih, H))
            if layer in c["engram_layer_ids"]:
                width = (c["engram_max_ngram_size"] - 1) * c["engram_n_heads"] * c["engram_head_dim"]
                fp8(f"{p}engram.wkv", H * (hc + 1), width)
                inv[f"{p}engram.q_weight"] = ("F32", (hc, H))
                inv[f"{p}engram.k_weight"] = ("F32", (hc, H))
                rows = c["engram_num_embeddings"][c["engram_layer_ids"].index(layer)]
                inv[f"{p}engram.embed.weight"] = ("F8_E4M3", (rows, c["engram_head_dim"]))
                inv[f"{p}engram.embed.scale"] = ("F8_E8M0", (rows, c["engram_head_dim"] // 32))
        elif ratio:
            coff = 2 if ratio == 4 else 1
            inv[f"{p}attn.compressor.ape"] = ("F32", (ratio, coff * hd))
            inv[f"{p}attn.compressor.wkv.weight"] = ("BF16", (coff * hd, H))
            inv[f"{p}attn.compressor.wgate.weight"] = ("BF16", (coff * hd, H))
            inv[f"{p}attn.compressor.norm.weight"] = ("BF16", (hd,))
            if ratio == 4:
                fp8(f"{p}attn.indexer.wq_b", ih * ihd, q)
                inv[f"{p}attn.indexer.weights_proj.weight"] = ("BF16", (ih, H))
                inv[f"{p}attn.indexer.compressor.ape"] = ("F32", (4, 2 * ihd))
                inv[f"{p}attn.indexer.compressor.wkv.weight"] = ("BF16", (2 * ihd, H))
                inv[f"{p}attn.indexer.compressor.wgate.weight"] = ("BF16", (2 * ihd, H))
                inv[f"{p}attn.indexer.compressor.norm.weight"] = ("BF16", (ihd,))

    inv["embed.weight"] = ("BF16", (V, H))
    inv["head.weight"] = ("BF16", (V, H))
    inv["norm.weight"] = ("BF16", (H,))
    if not v41:
        hc_head("")
    n_layers = c["num_hidden_layers"]
    for layer in range(n_layers):
        block(f"layers.{layer}.", layer, c["compress_ratios"][layer])
    for stage in range(c["num_nextn_predict_layers"]):
        p = f"mtp.{stage}."
        block(p, n_layers + stage, c["compress_ratios"][n_layers + stage])
        fp8(f"{p}e_proj", H, H)
        fp8(f"{p}h_proj", H, H)
        for n in ("enorm", "hnorm", "norm"):
            inv[f"{p}{n}.weight"] = ("BF16", (H,))
        hc_head(p)
    return inv


def shard_headers(folder: Path) -> dict[str, dict]:
    return {p.name: read_header(p) for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(params=["tiny", "tiny-base", "tiny-v41"])
def checkpoint(request) -> Path:
    return request.getfixturevalue(request.param.replace("-", "_") + "_checkpoint")


def test_file_set_is_the_official_one(checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert names - set(shards) == {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    numbers = [SHARD_RE.fullmatch(n).groups() for n in shards]
    assert [int(a) for a, _ in numbers] == list(range(1, len(shards) + 1))
    assert {int(b) for _, b in numbers} == {len(shards)}


def test_every_tensor_matches_the_layout_rules(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    headers = shard_headers(checkpoint)
    found = {name: (i.dtype, i.shape) for header in headers.values() for name, i in header.items()}
    vision = {n for n in found if n.startswith("vision.")}
    assert bool(vision) == (config["model_type"] == "deepseek_v41")
    expected = expected_inventory(config)
    assert sorted(set(expected) - set(found)) == []
    assert sorted(set(found) - set(expected) - vision) == []
    assert {n: found[n] for n in expected} == expected
    assert not any(n.startswith("model.") for n in found)


def test_index_covers_exactly_the_shards(checkpoint):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    headers = shard_headers(checkpoint)
    actual = {name: shard for shard, header in headers.items() for name in header}
    assert index["weight_map"] == actual
    total = sum(info.nbytes for header in headers.values() for info in header.values())
    assert index["metadata"] == {"total_size": total}


def test_shards_hold_one_part_each_in_release_order(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    c = config.get("text_config", config)
    groups = []
    for header in shard_headers(checkpoint).values():
        kinds = {re.sub(r"^(layers\.\d+\.engram\.embed|layers\.\d+|mtp\.\d+|vision)\..*", r"\1", n) for n in header}
        groups.append(kinds)
    layers = [{f"layers.{i}"} for i in range(c["num_hidden_layers"])]
    root = {"head.weight", "norm.weight"} | (
        {"hc_head_fn", "hc_head_base", "hc_head_scale"} if "text_config" not in config else set()
    )
    mtp = [{f"mtp.{i}"} for i in range(c["num_nextn_predict_layers"])]
    tail = []
    if "text_config" in config:  # V4.1: vision tower, then one shard per Engram table
        tail = [{"vision"}, *({f"layers.{i}.engram.embed"} for i in c["engram_layer_ids"])]
    assert groups == [{"embed.weight"}, *layers, root, *mtp, *tail]


def test_values_are_usable(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    c = config.get("text_config", config)
    block = config["quantization_config"]["weight_block_size"][0]
    for path in sorted(checkpoint.glob("*.safetensors")):
        header = read_header(path)
        data = path.read_bytes()
        for name, info in header.items():
            raw = np.frombuffer(data[info.start : info.end], dtype=np.uint8)
            if info.dtype == "F8_E4M3":
                assert not np.isin(raw, [0x7F, 0xFF]).any(), name
            elif info.dtype == "F8_E8M0":
                assert (raw < 255).all(), name
            elif info.dtype in ("F32", "BF16"):
                values = raw.view(np.float32) if info.dtype == "F32" else bf16_to_f32(raw.view(np.uint16))
                assert np.isfinite(values).all() and np.abs(values).max() < 10, name
                if name.endswith("norm.weight"):
                    assert abs(values.mean() - 1) < 0.1, name
            elif info.dtype == "I64":
                ids = raw.view(np.int64).reshape(info.shape)
                assert ((ids >= 0) & (ids < c["n_routed_experts"])).all()
                assert all(len(set(row)) == len(row) for row in ids.tolist())
        for name, info in header.items():
            if info.dtype == "I8":
                scale = header[name.replace(".weight", ".scale")]
                w = np.frombuffer(data[info.start : info.end], np.uint8).reshape(info.shape)
                s = np.frombuffer(data[scale.start : scale.end], np.uint8).reshape(scale.shape)
                values = fp4_e2m1_to_f32(w, s)
                assert 0.005 < values.std() < 0.05, name
            elif info.dtype == "F8_E4M3" and ".engram.embed" not in name:
                scale = header[name.replace(".weight", ".scale")]
                w = np.frombuffer(data[info.start : info.end], np.uint8).reshape(info.shape)
                s = np.frombuffer(data[scale.start : scale.end], np.uint8).reshape(scale.shape)
                assert 0.005 < dequant_fp8_block(w, s, block).std() < 0.05, name


def test_config_and_generation_config(tiny_checkpoint, tiny_base_checkpoint, tiny_v41_checkpoint):
    tiny = json.loads((tiny_checkpoint / "config.json").read_text())
    assert tiny["architectures"] == ["DeepseekV4ForCausalLM"] and tiny["expert_dtype"] == "fp4"
    assert tiny["quantization_config"]["weight_block_size"] == [128, 128]
    assert "expert_dtype" not in json.loads((tiny_base_checkpoint / "config.json").read_text())
    v41 = json.loads((tiny_v41_checkpoint / "config.json").read_text())
    assert v41["architectures"] == ["DeepseekV41ForCausalLM"]
    assert v41["quantization_config"]["weight_block_size"] == [32, 32]
    assert v41["quantization_config"]["expert_dtype"] == "fp4"
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)


def test_tokenizer_is_byte_level_bpe_with_deepseek_specials(tiny_checkpoint):
    tok = json.loads((tiny_checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    vocab = tok["model"]["vocab"]
    assert tok["model"]["type"] == "BPE"
    assert sorted(vocab.values()) == list(range(config["vocab_size"]))
    bos, eos, pad = (
        f"<{FF}begin{PIPE}of{PIPE}sentence{FF}>",
        f"<{FF}end{PIPE}of{PIPE}sentence{FF}>",
        f"<{FF}{PIPE}pad{PIPE}{FF}>",
    )
    assert (vocab[bos], vocab[eos], vocab[pad]) == (0, 1, 2)
    added = {t["content"]: t for t in tok["added_tokens"]}
    chat = [f"<{FF}{role}{FF}>" for role in ("User", "Assistant", "System")]
    tool = [f"{FF}DSML{FF}", "<|EOT|>", f"<{FF}tool{PIPE}calls{PIPE}begin{FF}>"]
    for special in (bos, eos, pad, *chat, "<think>", "</think>", *tool):
        assert added[special]["special"] is True and vocab[special] == added[special]["id"], special
    assert all(t["id"] == vocab[t["content"]] for t in tok["added_tokens"])
    # every byte has a token, and every merge joins two known tokens into a known token
    single = [t for t in vocab if len(t) == 1]
    assert len(single) == 256
    for merge in tok["model"]["merges"]:
        left, right = merge.split(" ")
        assert left in vocab and right in vocab and left + right in vocab
    assert len(tok["model"]["merges"]) == config["vocab_size"] - 256 - len(added)
    patterns = [p["pattern"]["Regex"] for p in tok["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split"]
    assert patterns == [
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ]
    assert tok["pre_tokenizer"]["pretokenizers"][-1]["type"] == "ByteLevel"
    tok_config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" not in tok_config
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["add_bos_token"]) == (bos, eos, False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-v41"])
def test_reruns_are_byte_identical(name, tmp_path, request):
    first = request.getfixturevalue(name.replace("-", "_") + "_checkpoint")
    write_tiny_checkpoint(get_model(name), tmp_path / name)
    files = sorted(p.name for p in first.iterdir())
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == files
    for file in files:
        assert (tmp_path / name / file).read_bytes() == (first / file).read_bytes(), file


@pytest.mark.slow
def test_rewrite_replaces_the_folder_and_cleans_up(tmp_path):
    spec = get_model("tiny-v41")
    folder = tmp_path / "models" / "tiny-v41"
    stale = tmp_path / "models" / ".tiny-v41.partial"
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00008.safetensors").write_bytes(b"junk")
    write_tiny_checkpoint(spec, folder)
    (folder / "leftover.txt").write_text("old")
    write_tiny_checkpoint(spec, folder)
    assert not (folder / "leftover.txt").exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-v41"]


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path):
    # experts 40 wide cannot be packed as FP4 (one scale per 32 values): the writer fails part-way
    broken = ModelSpec(name="broken", builtin=True, config={**get_model("tiny").config, "moe_intermediate_size": 40})
    with pytest.raises(ValueError, match="multiple of 32"):
        write_tiny_checkpoint(broken, tmp_path / "broken")
    assert list(tmp_path.iterdir()) == []


def test_dtype_census_of_a_ratio4_layer_matches_the_release(tiny_checkpoint):
    """A ratio-4 non-hash layer: 12 BF16 + 10 F32 + 9 FP8 + (9 + 3E) E8M0 + 3E I8 (docs/formats.md)."""
    header = read_header(tiny_checkpoint / "model-00004-of-00007.safetensors")
    census = Counter(info.dtype for info in header.values())
    experts = json.loads((tiny_checkpoint / "config.json").read_text())["n_routed_experts"]
    assert census == {"BF16": 12, "F32": 10, "F8_E4M3": 9, "F8_E8M0": 9 + 3 * experts, "I8": 3 * experts}
