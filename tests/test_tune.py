"""`dsv4 tune`: a real llama-bench search on the tiny model inside its budget, its cache, and plan/chat/serve
applying the result (flags and `--untuned` winning over it, a damaged file ignored with a note)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv4cli.models.ref import resolve_model

BUDGET_S = 60  # small, yet a busy shared machine still gets one tiny-model run in


@pytest.fixture(scope="module")
def tuned(engine, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    """One real tune of the tiny model with a small budget: (its home, the --json report, wall seconds)."""
    home = tmp_path_factory.mktemp("tune-home")
    env = {**os.environ, "DSV4_HOME": str(home)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dsv4cli", "tune", str(tiny_gguf), "--budget", f"{BUDGET_S}s", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=BUDGET_S + 120,
    )
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    return home, json.loads(proc.stdout), wall


def _tuned_file(tiny_gguf: Path, settings: dict) -> Path:
    """Write a tune result for the tiny model on this machine (the file `dsv4 tune` writes), with `settings`."""
    from dsv4cli.home import dsv4_home
    from dsv4cli.load.model_file import open_model_file
    from dsv4cli.plan import PlanInputs
    from dsv4cli.plan.tuning import tune_key
    from dsv4cli.tune import cache
    from dsv4cli.tune.settings import Settings

    key = tune_key(open_model_file(tiny_gguf).source, [], PlanInputs())
    return cache.save(dsv4_home(), key, Settings.from_dict(settings), model=tiny_gguf.name, report={})


SETTINGS = {"flash_attn": True, "threads": 1, "repack": False, "ubatch": 256, "kv_type": "q8_0", "mmap": True}


def test_tune_finishes_inside_its_budget_and_writes_the_cache(tuned) -> None:
    home, report, wall = tuned
    assert report["seconds"] <= BUDGET_S, report
    assert wall <= BUDGET_S + 30  # the interpreter, imports and the model's header around the search
    assert report["trials"] and report["trials"][0]["measured"]["tg_tps"] > 0  # the defaults were measured
    assert report["start_measured"]["pp_tps"] > 0
    saved = json.loads(Path(report["cache_file"]).read_text())
    assert Path(report["cache_file"]).parent == home / "tune"
    assert saved["settings"] == report["tuned"] and saved["key"]["devices"] == "cpu"


def test_plan_uses_the_tuned_result(tuned, tiny_gguf: Path, dsv4, monkeypatch: pytest.MonkeyPatch) -> None:
    home, report, _ = tuned
    monkeypatch.setenv("DSV4_HOME", str(home))
    result = dsv4("plan", str(tiny_gguf), "--json")
    assert result.code == 0, result.stderr
    plan = json.loads(result.stdout)
    for name in ("threads", "kv_type", "flash_attn", "ubatch", "repack", "mmap"):
        assert plan["assumptions"][name]["source"] == "tuned", name
    assert plan["llama"]["n_threads"] == report["tuned"]["threads"]
    assert plan["llama"]["n_ubatch"] == report["tuned"]["ubatch"]
    assert plan["llama"]["flash_attn"] == report["tuned"]["flash_attn"]


@pytest.mark.slow  # loads the model in llama.cpp
def test_plan_chat_and_serve_apply_the_tuned_settings(tiny_gguf: Path, dsv4) -> None:
    from dsv4cli.eval.run import prepare  # dsv4 eval's seam to loading
    from dsv4cli.load.placement import Placement
    from dsv4cli.load.prepared import load_params, prepare_model

    _tuned_file(tiny_gguf, SETTINGS)
    plan = json.loads(dsv4("plan", str(tiny_gguf), "--json").stdout)
    llama = plan["llama"]
    assert (llama["n_threads"], llama["n_ubatch"], llama["n_batch"]) == (1, 256, 256)
    assert (llama["type_k"], llama["flash_attn"], llama["use_mmap"]) == ("q8_0", True, True)
    params = load_params(tiny_gguf, Placement())
    assert (params.n_threads, params.n_ubatch, params.kv_type, params.use_mmap) == (1, 256, "q8_0", True)
    args = prepare_model(resolve_model(str(tiny_gguf)), Placement(), note=lambda _: None).llama_args
    pairs = dict(itertools.pairwise(args))
    assert (pairs["-t"], pairs["-ub"], pairs["-ctk"], pairs["-fa"]) == ("1", "256", "q8_0", "on")
    assert prepare(resolve_model(str(tiny_gguf)), Placement(), note=lambda _: None).params == params
    assert prepare(resolve_model(str(tiny_gguf)), Placement(untuned=True), note=lambda _: None).params.n_ubatch == 512
    # chat loads and answers with them
    result = dsv4("chat", str(tiny_gguf), "-p", "Hello", "--max-tokens", "4", "--temp", "0", "--json")
    assert result.code == 0, result.stderr
    _tuned_file(tiny_gguf, {**SETTINGS, "flash_attn": False, "kv_type": "f16"})
    assert json.loads(dsv4("plan", str(tiny_gguf), "--json").stdout)["llama"]["flash_attn"] is False


@pytest.mark.slow  # loads the model in llama.cpp
def test_flags_and_untuned_override_the_tuned_result(tiny_gguf: Path, dsv4) -> None:
    from dsv4cli.load.placement import Placement
    from dsv4cli.load.prepared import load_params, prepare_model
    from dsv4cli.system.hardware import cpu_threads

    _tuned_file(tiny_gguf, SETTINGS)
    flagged = json.loads(dsv4("plan", str(tiny_gguf), "--json", "--threads", "2", "--kv-type", "f16").stdout)
    assert flagged["assumptions"]["threads"]["source"] == "flag" and flagged["llama"]["n_threads"] == 2
    assert flagged["assumptions"]["kv_type"]["source"] == "flag" and flagged["llama"]["type_k"] == "f16"
    assert flagged["assumptions"]["ubatch"]["source"] == "tuned"  # the others still come from the tune
    forced = json.loads(dsv4("plan", str(tiny_gguf), "--json", "--no-flash-attn", "--kv-type", "q8_0").stdout)
    assert forced["assumptions"]["flash_attn"] == {"value": True, "unit": "", "source": "needed by the quantized cache"}
    off = json.loads(dsv4("plan", str(tiny_gguf), "--json", "--no-flash-attn", "--kv-type", "f16").stdout)
    assert off["assumptions"]["flash_attn"]["source"] == "flag" and off["llama"]["flash_attn"] is False
    untuned = json.loads(dsv4("plan", str(tiny_gguf), "--json", "--untuned").stdout)
    assert not any(f["source"] == "tuned" for f in untuned["assumptions"].values())
    assert untuned["llama"]["n_threads"] == cpu_threads() and untuned["llama"]["flash_attn"] is True
    params = load_params(tiny_gguf, Placement(untuned=True))
    assert (params.n_ubatch, params.kv_type, params.flash_attn) == (512, "f16", True)
    args = prepare_model(resolve_model(str(tiny_gguf)), Placement(untuned=True), note=lambda _: None).llama_args
    assert args[args.index("-ub") + 1] == "512"
    assert dsv4("chat", str(tiny_gguf), "--untuned", "-p", "Hi", "--max-tokens", "2", "--json").code == 0


def test_a_damaged_cache_is_ignored_with_a_note(tiny_gguf: Path, dsv4) -> None:
    from dsv4cli.load.placement import Placement
    from dsv4cli.load.prepared import load_params

    path = _tuned_file(tiny_gguf, SETTINGS)
    path.write_text('{"schema": "dsv4.tune/1", "settings": {"threads": "many"')
    result = dsv4("plan", str(tiny_gguf), "--json")
    assert result.code == 0
    assert not any(f["source"] == "tuned" for f in json.loads(result.stdout)["assumptions"].values())
    text = dsv4("plan", str(tiny_gguf))
    [line] = [ln for ln in text.stderr.splitlines() if "tuned settings" in ln]
    assert str(path) in line and "dsv4 tune" in line
    notes: list[str] = []
    assert load_params(tiny_gguf, Placement(), note=notes.append).n_ubatch == 512
    assert any(str(path) in n for n in notes)
    path.write_text(json.dumps({"schema": "dsv4.tune/1", "key": {}, "settings": SETTINGS}))  # another key's
    assert json.loads(dsv4("plan", str(tiny_gguf), "--json").stdout)["llama"]["n_ubatch"] == 512


@pytest.mark.slow  # loads the model in llama.cpp
def test_output_check_compares_greedy_text(tiny_gguf: Path) -> None:
    import dataclasses

    from dsv4cli.load.placement import Placement
    from dsv4cli.load.prepared import load_params
    from dsv4cli.tune.check import greedy_text, same_output

    params = load_params(tiny_gguf, Placement(ctx=1024, untuned=True))
    text = greedy_text(tiny_gguf, params, timeout=120, tokens=8)
    assert text  # the tiny model's random weights still decode 8 tokens
    assert same_output(tiny_gguf, params, params, deadline=time.monotonic() + 240)
    q8 = dataclasses.replace(params, kv_type="q8_0")
    assert same_output(tiny_gguf, params, q8, deadline=time.monotonic() + 240) == (
        greedy_text(tiny_gguf, q8, timeout=120) == greedy_text(tiny_gguf, params, timeout=120)
    )


@pytest.mark.parametrize("budget", ["0", "-5m", "10x", "25h", "2s"])
def test_bad_budget_is_one_line(dsv4, budget: str) -> None:
    result = dsv4("tune", "tiny", "--budget", budget)
    assert result.code != 0 and "--budget" in result.stderr and "Traceback" not in result.stderr


def test_gpu_settings_are_searched_and_applied(tiny_gguf: Path) -> None:
    from dsv4cli.plan import PlanInputs, make_plan
    from dsv4cli.tune.run import settings_of
    from dsv4cli.tune.settings import GPU_UBATCHES, dimensions

    full = make_plan(str(tiny_gguf), PlanInputs(vram_gib=(8.0,), untuned=True))
    n_layer = full.source.dims.n_layer
    start = settings_of(full)
    assert start.gpu_expert_layers == n_layer and not full.cpu_expert_layers  # 8 GiB holds the tiny model
    dims = dict(dimensions(start, physical=4, logical=8, repack_ok=True))
    assert dims["gpu_expert_layers"][0] == n_layer and min(dims["gpu_expert_layers"]) < n_layer
    assert dims["ubatch"] == GPU_UBATCHES and dims["threads"] == (4, 8) and dims["repack"] == (True, False)
    capped = make_plan(str(tiny_gguf), PlanInputs(vram_gib=(8.0,), untuned=True, gpu_expert_layers=1))
    assert capped.cpu_expert_layers == list(range(n_layer - 1))  # the top layer's experts stay on the GPU
    assert capped.assumptions["gpu_expert_layers"] == {"value": 1, "unit": "", "source": "flag"}
    assert any("ffn_(gate|up|down)_exps" in p for p in capped.load_params().host_tensors)
