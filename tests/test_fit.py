"""`dsv4 quantize --size`: size parsing, the allocation against exhaustive search, layers that matter more getting
more bits, and fitted tiny quants that stay under budget, load and generate in llama.cpp, and record their mix."""

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
from dsv4cli.models.fit import fit_measured, measure_fit
from dsv4cli.models.quantize import parse_size
from dsv4cli.models.registry import get_model
from dsv4cli.models.tiny import write_tiny_checkpoint
from quant.allocate import allocate, size_range
from quant.convert import QuantOptions
from quant.fit_groups import KEEP, fit_group, writer_of
from quant.gguf_out import temp_dir_for
from quant.importance import Option
from quant.mapping import gguf_tensor_specs
from quant.recipes import RECIPES
from tests.test_quant_cli import run_quantize, run_until_writing
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


def test_fit_groups_hold_every_large_matrix_and_its_path_into_the_stream() -> None:
    specs = gguf_tensor_specs(get_model("deepseek-v4-flash").hf_config())
    total, outside = sum(s.nbytes for s in specs), [s for s in specs if fit_group(s.name) is None]
    assert sum(s.nbytes for s in outside) < 1e-3 * total
    assert all(s.ggml_type in (0, 26) or s.name.endswith("ffn_gate_inp.weight") for s in outside)  # F32, I32, routers
    names = {s.name for s in specs}
    assert all(writer_of(s.name) in names for s in specs if fit_group(s.name))


def test_a_layer_that_writes_more_into_the_stream_gets_more_bits(tmp_path: Path) -> None:
    # the tiny model, its layer 0 writing 8x and its layer 3 1/8x what the others write into the residual stream
    write_tiny_checkpoint(get_model("tiny"), tmp_path / "tiny", layer_gains=(8.0, 1.0, 1.0, 0.125))
    measured = measure_fit(tmp_path / "tiny", QuantOptions(), None)
    smallest, _ = size_range(measured.options, measured.fixed)
    for share in (0.2, 0.4, 0.6):
        mix = fit_measured(measured, int(smallest + share * (measured.lossless - smallest)), QuantOptions()).options.mix
        # "kept" (the lossless conversion's BF16/F32) is only offered where it is larger than every type
        bits = {group: RECIPES[r].bits_per_weight if r != KEEP else np.inf for group, r in mix}
        for kind in ("experts", "attention", "shared", "hyper"):
            assert bits[f"{kind}.0"] > bits[f"{kind}.3"], (share, kind, mix)


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
    compressed = {"compressors.2", "compressors.3"}  # the tiny model compresses layers 2 (ratio 4) and 3 (128)
    layers = {f"{kind}.{n}" for kind in ("experts", "attention", "shared", "hyper") for n in range(4)}
    assert set(shown["fit"]["mix"]) == layers | compressed | {"embeddings", "output"}


@pytest.mark.slow
def test_a_killed_fitted_run_resumes_to_a_byte_identical_file(
    python: str, tiny_checkpoint: Path, tiny_imatrix: Path, tmp_path: Path
) -> None:
    extra = ("--size", "7M", "--imatrix", str(tiny_imatrix), "--split-max-size", "2M")
    clean = tmp_path / "clean" / "m.gguf"
    assert run_quantize(python, tiny_checkpoint, clean, *extra).returncode == 0
    out = tmp_path / "resumed" / "m.gguf"
    proc = run_until_writing(python, tiny_checkpoint, out, *extra, at_least=1 << 20)
    proc.kill()
    proc.wait()
    assert not out.exists() and temp_dir_for(out).exists()
    resumed = run_quantize(python, tiny_checkpoint, out, *extra)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after" in resumed.stdout
    clean_files, resumed_files = sorted(clean.parent.glob("*.gguf")), sorted(out.parent.glob("*.gguf"))
    assert len(clean_files) == len(resumed_files) > 1
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(clean_files, resumed_files, strict=True))


@pytest.mark.slow
def test_threads_change_the_speed_not_the_file(python: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    files = []
    for threads in ("1", "3"):
        out = tmp_path / threads / "m.gguf"
        res = run_quantize(python, tiny_checkpoint, out, "--size", "7M", "--threads", threads)
        assert res.returncode == 0, res.stderr
        files.append(out.read_bytes())
    assert files[0] == files[1]


@pytest.mark.slow
def test_a_fitted_quant_has_its_own_name_and_is_never_taken_for_its_base_recipe(dsv4, isolated_env: Path) -> None:
    from dsv4cli.home import gguf_dir
    from dsv4cli.models.local import find_gguf

    assert dsv4("pull", "tiny").code == 0
    res = dsv4("quantize", "tiny", "--size", "7M")
    assert res.code == 0, res.stderr
    fitted, lossless = gguf_dir() / "tiny-fit-6.68MiB.gguf", gguf_dir() / "tiny-mxfp4-q8_0.gguf"
    assert fitted.is_file() and not lossless.exists()  # not in the place of its base recipe's file
    listed = {m["name"]: m for m in json.loads(dsv4("list", "--json").stdout)}
    assert listed[fitted.name]["recipe"] == {"experts": "mxfp4", "dense": "q8_0", "fit": "mix"}
    assert "fitted mix" in dsv4("list").stdout and "fitted mix" in dsv4("show", str(fitted)).stdout
    assert find_gguf(get_model("tiny"), experts="mxfp4", dense="q8_0") is None  # chat tiny does not load it
    assert dsv4("quantize", "tiny").code == 0
    assert find_gguf(get_model("tiny"), experts="mxfp4", dense="q8_0") == lossless


# The tiny model on a machine of MACHINE: no layer fits 1 MiB of VRAM next to the compute buffer (CPU only), and
# host RAM holds the resident part (embedding, KV, compute buffer: about 12 MiB at 256 tokens) and the experts of
# a mix between the smallest (5.7 MiB) and the lossless (9.2 MiB) quant, within a default reserve of half the RAM.
MACHINE = ("--vram", "0.001", "--ctx", "256")
# GiB of RAM where the plan's memory model (weights, KV, compute buffer, reserve) fits a mix but not the 9.18 MiB
# lossless tiny quant: 0.030 fits nothing, 0.032-0.036 fit growing mixes, 0.038 fits the lossless one.
RAM = "0.034"


@pytest.mark.slow
def test_fit_writes_the_largest_quant_that_plans_as_fitting(python: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    def fitted(ram: str, *extra: str) -> int:
        res = _dsv4(tmp_path, "quantize", str(tiny_checkpoint), "--fit", "--ram", ram, *MACHINE, *extra)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)["budget"] if "--json" in extra else 0

    def verdict(model: str, *flags: str) -> str:
        res = _dsv4(tmp_path, "plan", model, *flags, *MACHINE)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1] if "fits:" in res.stdout else res.stdout

    small, large = fitted("0.032", "--dry-run", "--json"), fitted(RAM, "--dry-run", "--json")
    assert 6_014_655 < small < large < 9_600_000  # between the smallest mix and the lossless size, growing with RAM
    out = tmp_path / "fit.gguf"
    fitted(RAM, "-o", str(out))
    shown = json.loads(_dsv4(tmp_path, "show", str(out), "--json").stdout)
    assert out.stat().st_size <= large and shown["fit"]["budget"] == large
    assert verdict(str(out), "--ram", RAM).startswith("fits:")
    assert not verdict(str(tiny_checkpoint), "--ram", RAM).startswith("fits:")  # the lossless quant streams
    assert load_in_llama(python, out)["plain"] > 0
    # a bigger quant than the one chosen does not fit: the choice is the largest (to the bisection's bracket)
    res = _dsv4(
        tmp_path, "quantize", str(tiny_checkpoint), "--size", str(large + 40_000), "-o", str(tmp_path / "b.gguf")
    )
    assert res.returncode == 0, res.stderr
    assert not verdict(str(tmp_path / "b.gguf"), "--ram", RAM).startswith("fits:")
    # the same machine from a plan file
    plan = tmp_path / "plan.json"
    assert _dsv4(tmp_path, "plan", str(tiny_checkpoint), "--ram", RAM, *MACHINE, "-o", str(plan)).returncode == 0
    res = _dsv4(tmp_path, "quantize", str(tiny_checkpoint), "--fit", "--plan", str(plan), "--dry-run", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["budget"] == large, res.stderr
    for ram, words in (("0.02", "even the smallest mix"), ("0.05", "lossless quant (9.18 MiB) already fits")):
        res = _dsv4(tmp_path, "quantize", str(tiny_checkpoint), "--fit", "--ram", ram, *MACHINE)
        assert res.returncode != 0 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_plan_budgets_read_back_and_damaged_plans_are_one_line(tmp_path: Path) -> None:
    from dsv4cli.errors import PlanError
    from dsv4cli.plan import GIB
    from dsv4cli.plan.schema import plan_budgets

    tiers = [{"kind": "gpu", "budget_bytes": 24 * GIB}, {"kind": "ram", "budget_bytes": 56 * GIB}]
    inputs = {"no_disk": False, "ctx": 4096, "n_ubatch": 512, "kv_type": "f16", "margin_bytes": GIB}
    data = {
        "schema": "dsv4.plan/1",
        "tiers": tiers,
        "reserve_bytes": 8 * GIB,
        "llama": {"n_threads": 8},
        "inputs": inputs,
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    got = plan_budgets(path)
    assert (got.vram_gib, got.ram_gib, got.reserve_gib, got.ctx, got.threads) == ((24.0,), 64.0, 8.0, 4096, 8)
    path.write_text(json.dumps({**data, "tiers": [{"kind": "ram", "budget_bytes": "lots"}]}))
    with pytest.raises(PlanError, match=r"plan\.json: damaged plan"):
        plan_budgets(path)
    path.write_text(json.dumps({**data, "tiers": [*tiers, {"kind": "rpc", "budget_bytes": GIB}]}))
    with pytest.raises(PlanError, match="RPC workers"):
        plan_budgets(path)
