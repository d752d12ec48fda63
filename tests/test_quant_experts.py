"""Per-expert quantization of non-FP4 experts (tiny-base: FP8 experts) against plain quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from quant.codecs import dequant_fp8_block
from quant.convert import QuantOptions, QuantReport, quantize_checkpoint
from quant.experts import quantize_expert
from quant.quantizers import quantize
from quant.recipes import BY_TYPE, EXPERT_RECIPES
from quant.safetensors import Checkpoint

MXFP4 = GGMLQuantizationType.MXFP4
PROJ = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2"}


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_base_checkpoint: Path) -> tuple[Path, QuantReport]:
    out = tmp_path_factory.mktemp("base") / "tiny-base.gguf"
    return out, quantize_checkpoint(tiny_base_checkpoint, out, QuantOptions())


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.slow
def test_search_beats_plain_quantization_for_every_expert(
    base_gguf: tuple[Path, QuantReport], tiny_base_checkpoint: Path
) -> None:
    out, _ = base_gguf
    ckpt = Checkpoint(tiny_base_checkpoint)
    gains = []
    for t in GGUFReader(out).tensors:
        if t.name.split(".", 2)[-1] not in PROJ:
            continue
        assert t.tensor_type == MXFP4
        layer = t.name.split(".")[1]
        for e in range(t.data.shape[0]):
            stem = f"layers.{layer}.ffn.experts.{e}.{PROJ[t.name.split('.', 2)[-1]]}"
            source = dequant_fp8_block(ckpt.raw(f"{stem}.weight"), ckpt.raw(f"{stem}.scale"), 128)
            plain = rms(gguf_quants.dequantize(gguf_quants.quantize(source, MXFP4), MXFP4), source)
            ours = rms(gguf_quants.dequantize(np.ascontiguousarray(t.data[e]), MXFP4), source)
            assert ours < plain, stem
            gains.append(1 - ours / plain)
    assert len(gains) == 4 * 3 * 16
    print(f"median RMS reduction vs plain MXFP4: {np.median(gains):.2%} (min {min(gains):.2%})")


@pytest.mark.slow
def test_report_matches_gguf(base_gguf: tuple[Path, QuantReport]) -> None:
    out, report = base_gguf
    data = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert data["expert_method"] == "per-expert block scale search"
    assert len(data["expert_errors"]) == 4 * 3 * 16
    assert all(0 < e["rms"] < e["plain_rms"] and e["max_abs"] > 0 for e in data["expert_errors"])
    summary = json.loads(GGUFReader(out).fields["dsv4.expert_error_summary"].contents())
    assert summary["experts"] == 192 and summary["rms_max"] == pytest.approx(max(e.rms for e in report.expert_errors))
    assert report.worst(1)[0].rms == summary["rms_max"]


FAST = ("mxfp4", "q4_0", "q4_k")  # the first release's types; the other entries are in the slow tier


@pytest.mark.parametrize(
    "ggml_type",
    [
        pytest.param(GGMLQuantizationType(t), id=name, marks=() if name in FAST else pytest.mark.slow)
        for name, t in EXPERT_RECIPES.items()
    ],
)
def test_quantize_expert_never_worse_than_plain(ggml_type: GGMLQuantizationType) -> None:
    """The i-quants need importance (uniform here, so "plain" is the uniform-weighted quantizer)."""
    x = np.random.default_rng(7).standard_normal((64, 256)).astype(np.float32) * 0.02
    uniform = np.ones(256, dtype=np.float32) if BY_TYPE[ggml_type].needs_imatrix else None
    result = quantize_expert(x, ggml_type, uniform)
    plain = rms(gguf_quants.dequantize(quantize(x, ggml_type, imatrix=uniform), ggml_type), x)
    assert result.rms <= plain * (1 + 1e-6)
    assert result.plain_rms == pytest.approx(plain, rel=1e-6)
    assert result.rms == pytest.approx(rms(gguf_quants.dequantize(result.data, ggml_type), x), rel=1e-6)


FAST = ("mxfp4", "q4_0", "q4_k")  # the first release's types; the other entries are in the slow tier


@pytest.mark.parametrize(
    "ggml_type",
    [
        pytest.param(GGMLQuantizationType(t), id=name, marks=() if name in FAST else pytest.mark.slow)
        for name, t in EXPERT_RECIPES.items()
    ],
)
def test_activation_importance_lowers_weighted_error(ggml_type: GGMLQuantizationType) -> None:
    """With an importance matrix, every ggml-searched type keeps per row the encoding with the lower error weighted
    by it, so the weighted error is at most the unweighted quantizer's; the i-quants refuse to run without one."""
    recipe = BY_TYPE[ggml_type]
    x = np.random.default_rng(8).standard_normal((32, 256)).astype(np.float32) * 0.02
    importance = np.random.default_rng(9).gamma(0.5, size=256).astype(np.float32) + 1e-3
    if recipe.needs_imatrix:
        with pytest.raises(ValueError, match="importance"):
            quantize_expert(x, ggml_type)
    if recipe.quantizer != "ggml" or recipe.expert_search == "scale":
        return
    uniform = np.ones(256, dtype=np.float32) if recipe.needs_imatrix else None
    result = quantize_expert(x, ggml_type, importance)
    got = gguf_quants.dequantize(result.data, ggml_type)
    plain = gguf_quants.dequantize(quantize(x, ggml_type, imatrix=uniform), ggml_type)
    assert ((got - x) ** 2 * importance).sum() <= ((plain - x) ** 2 * importance).sum() * (1 + 1e-6)
