"""`dsv4 quantize --size`: size parsing, the allocation against exhaustive search, and fitted tiny quants that stay
under budget, load and generate in llama.cpp, and record their mix."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsv4cli.errors import UsageError
from dsv4cli.models.quantize import parse_size
from quant.allocate import allocate
from quant.importance import Option
from tests.test_quant_gguf import load_in_llama


def test_sizes_parse() -> None:
    assert parse_size("90G", flag="--size") == 90 * 10**9
    assert parse_size("85.5GiB", flag="--size") == int(85.5 * 2**30)
    assert parse_size("20933888", flag="--size") == 20933888
    with pytest.raises(UsageError, match="--size"):
        parse_size("lots", flag="--size")


def test_allocation_is_near_the_exhaustive_optimum() -> None:
    """On random convex-ish groups: never over budget, and the loss within 5 % of the best of all mixes."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        groups = {}
        for g in range(4):
            sizes = np.sort(rng.integers(10, 100, size=4)) + np.arange(4)
            losses = np.sort(rng.gamma(2.0, size=4))[::-1] * rng.uniform(0.1, 10)
            groups[f"g{g}"] = [
                Option(f"t{i}", int(s), float(v)) for i, (s, v) in enumerate(zip(sizes, losses, strict=True))
            ]
        low = sum(o[0].nbytes for o in groups.values())
        high = sum(o[-1].nbytes for o in groups.values())
        budget = 7 + int(rng.integers(low, high + 1))
        got = allocate(groups, budget, fixed=7)
        assert got.nbytes <= budget
        best = min(
            sum(o.loss for o in combo)
            for combo in itertools.product(*groups.values())
            if 7 + sum(o.nbytes for o in combo) <= budget
        )
        assert got.loss <= best * 1.05 + 1e-12


def _dsv4(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DSV4_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "dsv4cli", *argv], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow
def test_fitted_quants_stay_under_budget_load_and_show(
    python: str, tiny_checkpoint: Path, tiny_imatrix: Path, tmp_path: Path
) -> None:
    sizes = []
    for budget in (5_500_000, 7_000_000, 9_000_000):
        res = _dsv4(tmp_path, "quantize", str(tiny_checkpoint), "--size", str(budget), "--imatrix", str(tiny_imatrix),
                    "--dry-run", "--json")  # fmt: skip
        assert res.returncode == 0, res.stderr
        plan = json.loads(res.stdout)
        assert 0.99 * budget <= plan["bytes"] <= budget
        sizes.append(plan["bytes"])
    res = _dsv4(tmp_path, "quantize", str(tiny_checkpoint), "--size", "1M", "--imatrix", str(tiny_imatrix))
    assert res.returncode != 0 and "can be fitted" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    out = tmp_path / "fit.gguf"
    res = _dsv4(tmp_path, "quantize", str(tiny_checkpoint), "--size", "6M", "--imatrix", str(tiny_imatrix),
                "-o", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert 0.99 * 6e6 <= out.stat().st_size <= 6e6
    assert load_in_llama(python, out)["plain"] > 0
    shown = json.loads(_dsv4(tmp_path, "show", str(out), "--json").stdout)
    assert shown["fit"]["budget"] == 6_000_000 and shown["fit"]["imatrix"]["tokens"] == 256
    assert set(shown["fit"]["mix"]) == {"attention", "shared", "embeddings", "output"} | {
        f"experts.{n}" for n in range(4)
    }
