"""`dsv4 plan` tells the truth: machine figures with their sources, a cached calibration, the RAM reserve, a
disk-streaming verdict whose hints name only real options, and plans bound to their model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dsv4cli.errors import PlanError
from dsv4cli.models.registry import get_model
from dsv4cli.plan import GIB, PlanInputs, check_plan_model, load_plan, make_plan
from dsv4cli.plan.calibrate import cache_key, solve
from dsv4cli.plan.source import estimate_from_config
from dsv4cli.plan.verdict import recipe_bytes
from dsv4cli.system import hardware
from quant.fit_groups import fit_group
from quant.recipes import DENSE_RECIPES, EXPERT_RECIPES, RECIPES


def _plan_json(dsv4, *args: str) -> dict:
    res = dsv4("plan", *args, "--json")
    assert res.code == 0, res.stderr
    return json.loads(res.stdout)


def test_sources_in_json_and_threads_default_to_physical_cores(dsv4) -> None:
    plan = _plan_json(dsv4, "tiny", "--vram", "2", "--ram", "8", "--ram-bw", "14.5543")
    figures = plan["assumptions"]
    assert figures["threads"] == {
        "value": psutil.cpu_count(logical=False),
        "unit": "",
        "source": "default: physical cores",
    }
    assert figures["ram_bw"] == {"value": 14.6, "unit": "GB/s", "source": "flag"}  # rounded as people read it
    assert figures["ctx"]["source"] == "default" and figures["kv_type"] == {
        "value": "f16",
        "unit": "",
        "source": "default",
    }
    assert figures["flash_attn"]["value"] is True  # a GPU plan
    # nothing measured in a fresh home: CPU figures say so, GPU figures are assumed, never "measured"
    assert figures["cpu_dense_gemv"]["source"] == "default" and figures["disk_bw"]["source"] == "default"
    assert figures["gpu_node_cost"]["source"] == "assumed" and figures["gpu0_bw"]["source"] == "assumed"
    assert plan["llama"]["n_threads"] == psutil.cpu_count(logical=False)
    flagged = _plan_json(dsv4, "tiny", "--ram", "8", "--threads", "3", "--cpu-gbs", "5", "--ctx", "2048")
    assert flagged["assumptions"]["threads"]["source"] == "flag" and flagged["llama"]["n_threads"] == 3
    assert flagged["assumptions"]["cpu_dense_gemv"] == {"value": 15.0, "unit": "GB/s", "source": "flag"}
    assert flagged["assumptions"]["ctx"] == {"value": 2048, "unit": "tokens", "source": "flag"}


def test_table_shows_assumptions_and_uncalibrated_note(dsv4) -> None:
    res = dsv4("plan", "tiny", "--ram", "8", "--disk-bw", "2.345")
    assert res.code == 0, res.stderr
    assert "assumptions" in res.stdout and "default: physical cores" in res.stdout
    assert "2.3 GB/s" in res.stdout and "2.345" not in res.stdout
    assert "--calibrate" in res.stderr


@pytest.mark.slow
def test_calibration_cache_is_keyed_and_reused(isolated_env: Path) -> None:
    """A cached calibration for this CPU, build, recipe and thread count is used as measured; nothing is
    generated or decoded. Another thread count (another key) falls back to defaults and says so."""
    key = cache_key(experts="mxfp4", dense="q8_0", threads=1)
    entry = {"token_s": 0.001, "layer_s": 0.002, "dense_gbs": 3.0, "expert_gbs": 1.5, "threads": 1, "experts": "mxfp4",
             "dense": "q8_0", "key": key, "measured_at": 1.0}  # fmt: skip
    hardware.update_machine_cache(isolated_env, {"calibration": {key: entry}, "ram_gbs": 12.0, "disk_gbs": 0.9})
    plan = make_plan("tiny", PlanInputs(vram_gib=(), ram_gib=8, threads=1)).to_dict()
    figures = plan["assumptions"]
    assert figures["cpu_dense_gemv"] == {"value": 3.0, "unit": "GB/s", "source": "measured"}
    assert figures["cpu_expert_gemv"]["value"] == 1.5 and figures["cpu_layer_cost"]["value"] == 2.0
    assert figures["ram_bw"] == {"value": 12.0, "unit": "GB/s", "source": "measured"}
    assert not (isolated_env / "calibration").exists()  # reused, not measured
    # the bandwidth cache (dsv4 doctor) keeps the calibration when it re-measures
    hardware.measured_bandwidths(isolated_env, remeasure=True)
    assert key in hardware.read_machine_cache(isolated_env)["calibration"]
    other = make_plan("tiny", PlanInputs(vram_gib=(), ram_gib=8, threads=1, experts="q4_0")).to_dict()
    assert other["assumptions"]["cpu_dense_gemv"]["source"] == "default"


@pytest.mark.slow
def test_calibrate_times_this_machine_and_the_plan_uses_it(dsv4, isolated_env: Path) -> None:
    """`plan --calibrate` generates its own timing models (larger than a built-in registry entry may be: this was
    refused as "too large to write") and the plan then takes its CPU figures as measured."""
    res = dsv4("plan", "tiny", "--calibrate", "--json")
    assert res.code == 0, res.stderr
    figures = json.loads(res.stdout)["assumptions"]
    assert figures["cpu_dense_gemv"]["source"] == figures["cpu_expert_gemv"]["source"] == "measured"
    assert figures["cpu_dense_gemv"]["value"] > 0 and figures["cpu_expert_gemv"]["value"] > 0
    assert "--calibrate" not in dsv4("plan", "tiny").stderr


def test_reserve_is_kept_free(dsv4) -> None:
    plan = _plan_json(dsv4, "tiny", "--ram", "10", "--reserve", "3")
    ram = next(t for t in plan["tiers"] if t["name"] == "ram")
    assert ram["budget_bytes"] == 7 * GIB and plan["reserve_bytes"] == 3 * GIB
    assert plan["assumptions"]["ram_reserve"] == {"value": 3.0, "unit": "GiB", "source": "flag"}
    default = _plan_json(dsv4, "tiny", "--ram", "64")
    assert default["reserve_bytes"] == int(6.4 * GIB)  # max(2 GiB, 10 %)
    assert next(t for t in default["tiers"] if t["name"] == "ram")["budget_bytes"] == 64 * GIB - int(6.4 * GIB)
    res = dsv4("plan", "tiny", "--ram", "4", "--reserve", "5")
    assert res.code == 1 and "--reserve" in res.stderr and "Traceback" not in res.stderr


def test_disk_streaming_verdict_and_hints_name_real_options(dsv4) -> None:
    plan = _plan_json(dsv4, "deepseek-v4-flash", "--vram", "24", "--ram", "64")
    disk = next(t for t in plan["tiers"] if t["name"] == "disk")
    assert disk["weights_bytes"] > 0
    assert plan["verdict"].startswith("streams from disk:") and "tok/s" in plan["verdict"]
    ram_hint, recipe_hint = plan["hints"][0], plan["hints"][1]
    # the RAM it names really holds every weight, reserve included
    ram_gib = ram_hint.split("--ram ")[1].split(",")[0]
    assert _plan_json(dsv4, "deepseek-v4-flash", "--vram", "24", "--ram", ram_gib)["verdict"].startswith("fits:")
    # the recipe it names exists and is really smaller: plan it and compare file bytes
    experts, dense = recipe_hint.split("--experts ")[1].split()[0], recipe_hint.split("--dense ")[1].split()[0]
    assert experts in EXPERT_RECIPES and dense in DENSE_RECIPES
    assert not RECIPES[experts].needs_imatrix and not RECIPES[dense].needs_imatrix  # runs without `dsv4 imatrix`
    # the fitted quant for these budgets, named while its smallest mix (i-quants) would hold every weight
    assert "`dsv4 quantize deepseek-v4-flash --fit --vram 24 --ram 64` writes" in plan["hints"][2]
    # ... and that smallest mix (the i-quants, Q4_K embeddings and head) does fit: plan its exact tensor list
    config = get_model("deepseek-v4-flash").hf_config()
    groups = {fit_group(name) for name in plan["tensors"]} - {None}
    mix = {g: "q4_k" if g in ("embeddings", "output") else "iq2_xxs" for g in groups}
    smallest = estimate_from_config(config, name="smallest", experts="mxfp4", dense="q8_0", mix=mix)
    assert make_plan(smallest, PlanInputs(vram_gib=(24.0,), ram_gib=64)).verdict.startswith("fits:")
    tight = _plan_json(dsv4, "deepseek-v4-flash", "--vram", "24", "--ram", "32")
    assert not any("--fit" in hint for hint in tight["hints"])
    smaller = _plan_json(
        dsv4, "deepseek-v4-flash", "--vram", "24", "--ram", "64", "--experts", experts, "--dense", dense
    )
    assert smaller["source"]["file_bytes"] < plan["source"]["file_bytes"]
    res = dsv4("plan", "deepseek-v4-flash", "--vram", "24", "--ram", "64", "--no-disk")
    assert res.code == 1 and "short by" in res.stderr and f"--ram {ram_gib}" in res.stderr


def test_recipe_bytes_match_the_converter(tiny_gguf: Path) -> None:
    """Retyping the tiny GGUF's tensors gives exactly the bytes `dsv4 quantize` would write in each recipe."""
    exact = make_plan(str(tiny_gguf), PlanInputs(vram_gib=(), ram_gib=8, threads=1))
    sizes = recipe_bytes(exact.source.tensors, exact.source.recipe, exact.source.dims.n_layer)
    for experts, dense in ((e, d) for e in EXPERT_RECIPES for d in DENSE_RECIPES):
        estimate = make_plan("tiny", PlanInputs(vram_gib=(), ram_gib=8, threads=1, experts=experts, dense=dense))
        assert sizes[(experts, dense)] == sum(s.nbytes for s in estimate.source.tensors), (experts, dense)


def test_gpu_plan_is_not_capped_by_launch_overhead(dsv4) -> None:
    """The whole model on one GPU: bandwidth-bound (~11 GB per token at 4 TB/s) plus a small assumed launch cost."""
    plan = _plan_json(dsv4, "deepseek-v4-flash", "--vram", "200", "--ram", "64", "--vram-bw", "4000", "--ctx", "4096")
    assert plan["llama"]["n_gpu_layers"] == 44 and plan["verdict"].startswith("fits:")
    assert not any(t == "ram" for n, t in plan["tensors"].items() if "_exps." in n)
    assert plan["estimates"]["decode_tok_s"] > 60
    assert plan["assumptions"]["gpu0_bw"]["source"] == "flag"


def test_plan_is_bound_to_its_model(dsv4, tiny_gguf: Path, tmp_path: Path) -> None:
    flash = tmp_path / "flash.json"
    assert dsv4("plan", "deepseek-v4-flash", "--vram", "24", "--ram", "256", "-o", str(flash)).code == 0
    data = load_plan(flash)
    assert data["model"]["name"] == "deepseek-v4-flash" and data["model"]["files"] == []
    with pytest.raises(PlanError, match="made for 'deepseek-v4-flash', not tiny"):
        check_plan_model(data, tiny_gguf, plan_path=flash)
    # a plan for the registry model `tiny` is for exactly the GGUF `dsv4 quantize tiny` writes
    tiny = tmp_path / "tiny.json"
    assert dsv4("plan", "tiny", "--ram", "4", "-o", str(tiny)).code == 0
    check_plan_model(load_plan(tiny), tiny_gguf, plan_path=tiny)
    exact = tmp_path / "exact.json"
    assert dsv4("plan", str(tiny_gguf), "--ram", "4", "-o", str(exact)).code == 0
    model = load_plan(exact)["model"]
    assert model["files"] == [tiny_gguf.name] and model["file_bytes"] == tiny_gguf.stat().st_size
    argv = [sys.executable, "-m", "dsv4cli", "chat", str(tiny_gguf), "--plan", str(flash), "-p", "Hi"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "made for 'deepseek-v4-flash'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_calibration_solve_recovers_the_terms() -> None:
    """Three runs made from known costs give those costs back; noise that would make a term negative falls back
    to subtracting the known terms run by run, never a negative or zero figure."""
    token_s, layer_s, dense_s, expert_s = 3e-4, 4e-4, 1 / 8e9, 1 / 5e9
    shapes = [(4, 9e6, 1e6), (2, 5e6, 0.5e6), (2, 80e6, 2e6), (2, 40e6, 90e6)]
    runs = [(token_s + n * layer_s + d * dense_s + e * expert_s, n, d, e) for n, d, e in shapes]
    assert solve(runs) == pytest.approx((token_s, layer_s, dense_s, expert_s), rel=1e-9)
    noisy = [*runs[:3], (runs[3][0] * 0.3, *runs[3][1:])]  # the experts run "faster" than its dense part
    assert all(term > 0 for term in solve(noisy))
    # a per-token cost lost in the noise (a slightly negative exact term): zero, and the rest by least squares
    no_token = [(t - token_s + (1e-6 if i == 0 else 0.0), n, d, e) for i, (t, n, d, e) in enumerate(runs)]
    got = solve(no_token)
    assert got[0] == 0.0 and got[1:] == pytest.approx((layer_s, dense_s, expert_s), rel=0.05)


def test_serve_refuses_a_plan_for_another_model(dsv4, tiny_gguf: Path, tmp_path: Path) -> None:
    """`dsv4 serve --plan` places the model through the same check as chat (`load.prepared.prepare_model`)."""
    from dsv4cli.load.placement import Placement
    from dsv4cli.load.prepared import prepare_model
    from dsv4cli.models.ref import ModelRef

    flash = tmp_path / "flash.json"
    assert dsv4("plan", "deepseek-v4-flash", "--vram", "24", "--ram", "256", "-o", str(flash)).code == 0
    ref = ModelRef(str(tiny_gguf), "gguf", path=tiny_gguf)
    with pytest.raises(PlanError, match="made for 'deepseek-v4-flash'"):
        prepare_model(ref, Placement(plan_file=flash), note=lambda _: None)
