"""`dsv4 imatrix` against independent expectations: the statistics llama.cpp's own matmuls saw, the floor
treatment of rarely routed experts, and the file round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quant.imatrix import Imatrix, load_imatrix, save_imatrix


def test_floor_tops_up_with_the_layer_mean(tmp_path: Path) -> None:
    """An expert below the floor is blended with the layer mean as if its missing tokens had it; one no token
    reached is the layer mean; the rest stand alone. The file keeps everything."""
    m = Imatrix(floor=4)
    rows = np.array([[1.0, 2.0], [3.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    m.add("blk.0.ffn_gate_exps.weight", 3, np.array([0, 0, 0, 0, 0, 1, 1]), rows)
    sums, counts = m.sums["blk.0.ffn_gate_exps.weight"], m.counts["blk.0.ffn_gate_exps.weight"]
    assert counts.tolist() == [5, 2, 0]
    layer_mean = (rows**2).sum(axis=0) / 7
    got = m.importance("blk.0.ffn_gate_exps.weight")
    np.testing.assert_allclose(got[0], sums[0] / 5, rtol=1e-6)
    np.testing.assert_allclose(got[1], (sums[1] + 2 * layer_mean) / 4, rtol=1e-6)
    np.testing.assert_allclose(got[2], layer_mean, rtol=1e-6)
    assert m.below_floor("blk.0.ffn_gate_exps.weight") == [1, 2]
    save_imatrix(m, tmp_path / "m.imatrix.gguf")
    back = load_imatrix(tmp_path / "m.imatrix.gguf")
    assert back.floor == 4 and back.counts["blk.0.ffn_gate_exps.weight"].tolist() == [5, 2, 0]
    np.testing.assert_allclose(back.importance("blk.0.ffn_gate_exps.weight"), got, rtol=1e-6)


@pytest.mark.slow
def test_statistics_from_the_engine(tiny_imatrix: Path) -> None:
    """Every token goes through the shared expert and through k routed experts, with the same input: so the
    routed counts sum to k x tokens, gate and up saw the same rows, and the routed sums (MUL_MAT_ID, per expert)
    add up to k times the shared expert's (MUL_MAT). The grouped output projection has one matrix per group."""
    m = load_imatrix(tiny_imatrix)
    k, layers = 4, 4  # tiny: num_experts_per_tok, num_hidden_layers
    assert m.tokens == 256 and m.chunks == 2
    for layer in range(layers):
        gate = f"blk.{layer}.ffn_gate_exps.weight"
        assert m.counts[gate].sum() == k * m.tokens
        np.testing.assert_array_equal(m.counts[gate], m.counts[f"blk.{layer}.ffn_up_exps.weight"])
        np.testing.assert_allclose(m.sums[gate], m.sums[f"blk.{layer}.ffn_up_exps.weight"], rtol=1e-6)
        shared = m.sums[f"blk.{layer}.ffn_gate_shexp.weight"][0]
        np.testing.assert_allclose(m.sums[gate].sum(axis=0), k * shared, rtol=1e-3)
        assert m.sums[f"blk.{layer}.attn_output_a.weight"].shape == (2, 128)  # o_groups x (heads x dim / groups)
        assert m.counts[f"blk.{layer}.attn_q_a.weight"].tolist() == [m.tokens]


@pytest.mark.slow
def test_cli_reports_coverage_and_caches(tiny_gguf: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DSV4_HOME": str(tmp_path)}
    argv = [sys.executable, "-m", "dsv4cli", "imatrix", str(tiny_gguf), "--chunks", "1", "--chunk", "64"]
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout and "layer 3: 16 experts" in first.stdout and "topped up" in first.stdout
    again = subprocess.run([*argv, "--json"], capture_output=True, text=True, env=env, timeout=300)
    data = json.loads(again.stdout)
    assert data["cached"] and len(data["experts"]) == 4
    # 64 tokens x 4 slots over 16 experts: some experts fall below the floor of 16 and are listed
    assert all(sorted(c["below_floor"]) == c["below_floor"] for c in data["experts"])


def test_refuses_a_checkpoint_and_a_missing_text(dsv4, tiny_checkpoint: Path) -> None:
    res = dsv4("imatrix", str(tiny_checkpoint))
    assert res.code != 0 and "dsv4 quantize" in res.stderr and "Traceback" not in res.stderr
