"""The tiny GGUF's bytes against independent expectations, and loading it with the real llama.cpp (subprocess)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from quant.codecs import dequant_fp8_block
from quant.convert import QuantOptions, quantize_checkpoint
from quant.safetensors import Checkpoint

# GGUF tensor suffix -> checkpoint suffix for the FP8 projections that become Q8_0 (docs/formats.md)
FP8_SOURCES = {
    "attn_q_a.weight": "attn.wq_a",
    "attn_q_b.weight": "attn.wq_b",
    "attn_kv.weight": "attn.wkv",
    "attn_output_a.weight": "attn.wo_a",
    "attn_output_b.weight": "attn.wo_b",
    "indexer.attn_q_b.weight": "attn.indexer.wq_b",
    "ffn_gate_shexp.weight": "ffn.shared_experts.w1",
    "ffn_up_shexp.weight": "ffn.shared_experts.w3",
    "ffn_down_shexp.weight": "ffn.shared_experts.w2",
}
EXPERT_SOURCES = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2"}
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from llama_cpp import Llama
    from dsv4cli.system.llama_lib import apply_to_llama_class
    apply_to_llama_class()  # the repacking choice dsv4 makes (off on AMX CPUs)
    llm = Llama(sys.argv[1], n_ctx=256, verbose=False, seed=1)
    plain = llm.create_completion("The quick brown fox", max_tokens=8, temperature=0)
    chat = llm.create_chat_completion([{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    print(json.dumps({"plain": plain["usage"]["completion_tokens"], "chat": chat["usage"]["completion_tokens"],
                      "meta": {k: v for k, v in llm.metadata.items() if k.startswith("dsv4.")}}))
    """
)


def load_in_llama(python: str, path: Path) -> dict:
    """Load and generate in a subprocess: a GGML_ASSERT aborts the whole process, not just the call."""
    proc = subprocess.run([python, "-c", LOAD_SCRIPT, str(path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def reference_repack(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The MXFP4 repack (docs/formats.md): byte 0 = scale byte, byte 1 + j = code[32g + j] | code[32g + j + 16] << 4."""
    packed = packed.view(np.uint8)
    rows, half = packed.shape
    code = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(rows, half * 2)
    out = np.zeros((rows, half * 2 // 32, 17), dtype=np.uint8)
    for g in range(half * 2 // 32):
        out[:, g, 0] = scale.view(np.uint8)[:, g]
        for j in range(16):
            out[:, g, 1 + j] = code[:, 32 * g + j] | (code[:, 32 * g + j + 16] << 4)
    return out.reshape(rows, -1)


@pytest.mark.slow
def test_loads_and_generates(python: str, tiny_gguf: Path) -> None:
    result = load_in_llama(python, tiny_gguf)
    assert result["plain"] > 0 and result["chat"] > 0
    assert result["meta"]["dsv4.experts"] == "mxfp4" and result["meta"]["dsv4.dense"] == "q8_0"
    assert json.loads(result["meta"]["dsv4.expert_error_summary"])["method"] == "lossless FP4 repack"


def test_experts_byte_identical_to_fp4_repack(tiny_gguf: Path, tiny_checkpoint: Path) -> None:
    ckpt = Checkpoint(tiny_checkpoint)
    got = tensors(tiny_gguf)
    n_layers, n_experts = ckpt.config["num_hidden_layers"], ckpt.config["n_routed_experts"]
    for layer in range(n_layers):
        for suffix, w in EXPERT_SOURCES.items():
            t = got[f"blk.{layer}.{suffix}"]
            assert t.tensor_type == GGMLQuantizationType.MXFP4
            for e in range(n_experts):
                stem = f"layers.{layer}.ffn.experts.{e}.{w}"
                want = reference_repack(ckpt.raw(f"{stem}.weight"), ckpt.raw(f"{stem}.scale"))
                assert np.array_equal(t.data[e], want), f"{stem}"


def test_q8_0_identical_to_q8_0_of_dequantized_fp8(tiny_gguf: Path, tiny_checkpoint: Path) -> None:
    ckpt = Checkpoint(tiny_checkpoint)
    checked = 0
    for name, t in tensors(tiny_gguf).items():
        suffix = name.split(".", 2)[2] if name.startswith("blk.") else name
        if suffix not in FP8_SOURCES:
            continue
        stem = f"layers.{name.split('.')[1]}.{FP8_SOURCES[suffix]}"
        x = dequant_fp8_block(ckpt.raw(f"{stem}.weight"), ckpt.raw(f"{stem}.scale"), 128)
        want = gguf_quants.quantize(x, GGMLQuantizationType.Q8_0)
        assert t.tensor_type == GGMLQuantizationType.Q8_0
        assert np.array_equal(t.data.reshape(want.shape), want), name
        checked += 1
    assert checked == 4 * 8 + 1  # 8 per layer + the one indexer query projection


def test_bf16_f32_and_i32_copied_exactly(tiny_gguf: Path, tiny_checkpoint: Path) -> None:
    ckpt = Checkpoint(tiny_checkpoint)
    got = tensors(tiny_gguf)
    assert np.array_equal(got["token_embd.weight"].data.view(np.uint16), ckpt.raw("embed.weight"))
    assert np.array_equal(
        got["blk.2.attn_compressor_kv.weight"].data.view(np.uint16), ckpt.raw("layers.2.attn.compressor.wkv.weight")
    )
    assert np.array_equal(got["blk.0.hc_attn_fn.weight"].data, ckpt.raw("layers.0.hc_attn_fn"))
    assert np.array_equal(got["blk.3.attn_compressor_ape.weight"].data, ckpt.raw("layers.3.attn.compressor.ape"))
    norm_bits = ckpt.raw("norm.weight").astype(np.uint32) << 16
    assert np.array_equal(got["output_norm.weight"].data, norm_bits.view(np.float32))
    tid2eid = got["blk.0.ffn_gate_tid2eid.weight"]
    assert tid2eid.tensor_type == GGMLQuantizationType.I32
    assert np.array_equal(tid2eid.data, ckpt.raw("layers.0.ffn.gate.tid2eid").astype(np.int32))


def test_report_beside_gguf(tiny_gguf: Path) -> None:
    report = json.loads(tiny_gguf.with_name(tiny_gguf.name + ".report.json").read_text())
    assert len(report["expert_errors"]) == 4 * 3 * 16
    assert report["summary"]["rms_max"] == 0.0


@pytest.mark.slow
def test_split_output_loads(python: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "split.gguf"
    report = quantize_checkpoint(tiny_checkpoint, out, QuantOptions(split_max_size=3_000_000))
    names = [Path(p).name for p in report.outputs]
    assert len(names) > 1 and names[0] == f"split-00001-of-{len(names):05d}.gguf"
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "split.gguf.report.json"])
    assert load_in_llama(python, Path(report.outputs[0]))["plain"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(("experts", "dense", "mtp"), [("q4_k", "q4_k", False), ("q4_0", "bf16", True)])
def test_other_recipes_load(
    python: str, tiny_checkpoint: Path, tmp_path: Path, experts: str, dense: str, mtp: bool
) -> None:
    out = tmp_path / "recipe.gguf"
    report = quantize_checkpoint(tiny_checkpoint, out, QuantOptions(experts=experts, dense=dense, mtp=mtp))
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == GGMLQuantizationType[experts.upper()]
    assert ("blk.4.nextn.eh_proj.weight" in types) == mtp
    assert all(e.rms <= e.plain_rms for e in report.expert_errors)
    assert load_in_llama(python, out)["plain"] > 0


def test_v41_converts_to_deepseek41(tiny_v41_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "v41.gguf"
    quantize_checkpoint(tiny_v41_checkpoint, out, QuantOptions())
    reader = GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "deepseek41"
    names = {t.name for t in reader.tensors}
    assert {"blk.1.engram_embd.weight", "blk.1.engram_wkv.weight", "blk.2.indexer.attn_k.weight"} <= names
    assert not any(n.startswith("vision") for n in names)
