"""The llama.cpp build as dsv4 drives it: extra buffer types on and off, one-line aborts, CPU-only builds.

Everything that loads a GGUF or trips an assert runs in a subprocess (an abort ends the process).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4cli.system import llama_lib

GENERATE = """
import json, sys
from pathlib import Path
from dsv4cli.engine import LoadParams, SampleOptions, TurnStats
from dsv4cli.engine.inprocess import LlamaEngine

extra = {"on": True, "off": False}[sys.argv[2]]
engine = LlamaEngine(Path(sys.argv[1]), LoadParams(n_ctx=1024, n_threads=2, use_extra_bufts=extra), verbose=True)
events = list(engine.stream("<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>",
                            SampleOptions(max_tokens=16, temp=0)))
stats = events.pop()
assert isinstance(stats, TurnStats)
print(json.dumps({"text": "".join(events), "tokens": stats.generated_tokens}))
"""


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def _aborted_as_amx_does(res: subprocess.CompletedProcess[str], setting: str) -> bool:
    """Why `auto` means off on AMX machines: this llama.cpp assigns the AMX buffer's graph nodes no backend and
    aborts. Forcing repacking on there must fail in the subprocess (checked here), never in our process."""
    if setting != "on" or "AMX" not in llama_lib.extra_buffer_types():
        return False
    assert res.returncode != 0 and "cur_backend_id != -1" in res.stderr, res.stderr[-2000:]
    return True


@pytest.mark.slow
def test_generates_with_extra_buffer_types_on_and_off(tiny_gguf: Path) -> None:
    """Both load paths (AMX machines take `off` automatically) load, generate, and agree on greedy output."""
    results = {}
    for setting in ("on", "off"):
        res = run_python(GENERATE, str(tiny_gguf), setting)
        if _aborted_as_amx_does(res, setting):
            continue
        assert res.returncode == 0, res.stderr[-2000:]
        results[setting] = json.loads(res.stdout)
        assert results[setting]["tokens"] > 0
        repacked = re.findall(r"(\w+) model buffer size", res.stderr)
        extras = set(llama_lib.extra_buffer_types())
        if setting == "off":
            assert not extras & set(repacked), repacked
        elif "CPU_REPACK" in extras:  # x86-64 with AVX2 and arm64 repack the tiny model's MXFP4 experts
            assert "CPU_REPACK" in repacked, repacked
    if len(results) == 2:
        assert results["on"]["text"] == results["off"]["text"]


def test_repack_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert llama_lib.use_extra_bufts(True) is True and llama_lib.use_extra_bufts(False) is False
    monkeypatch.setenv("DSV4_REPACK", "off")
    assert llama_lib.use_extra_bufts() is False
    monkeypatch.setenv("DSV4_REPACK", "on")
    assert llama_lib.use_extra_bufts() is True
    monkeypatch.setenv("DSV4_REPACK", "auto")
    assert llama_lib.use_extra_bufts() is ("AMX" not in llama_lib.extra_buffer_types())
    monkeypatch.setenv("DSV4_REPACK", "sometimes")
    with pytest.raises(llama_lib.UsageError, match="DSV4_REPACK"):
        llama_lib.use_extra_bufts()


TRIP_ASSERT = """
import ctypes, sys
from pathlib import Path
from dsv4cli.system import llama_lib

llama_lib.install_abort_handler(Path(sys.argv[1]))
ggml = llama_lib.ggml()
print("before", flush=True)
ggml.ggml_backend_dev_get(ggml.ggml_backend_dev_count() + 1000)  # GGML_ASSERT(index < ggml_backend_dev_count())
print("not reached", flush=True)
"""


@pytest.mark.slow
def test_a_llama_cpp_assert_is_one_line_and_exit_1(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    res = run_python(TRIP_ASSERT, str(model))
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert res.stdout == "before\n"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "GGML_ASSERT(index < ggml_backend_dev_count()) failed" in lines[0]
    assert str(model) in lines[0] and "DSV4_REPACK=off" in lines[0]
    assert "gdb" not in res.stderr and "backtrace" not in res.stderr.lower()


def test_capabilities_agree_with_llama_cpp() -> None:
    import llama_cpp

    info = llama_lib.build_info()
    assert info.gpu_offload == bool(llama_cpp.llama_supports_gpu_offload())
    assert "CPU" in info.backends
    if info.backends == ("CPU",):  # a CPU-only wheel, as `make setup` installs without GPU=...
        assert info.gpu_offload is False
    assert info.version == llama_cpp.__version__


def test_parse_system_info() -> None:
    text = "CPU : SSE3 = 1 | AVX = 1 | AVX512 = 0 | AMX_INT8 = 1 | REPACK = 1 | "
    assert llama_lib.parse_system_info(text) == ("SSE3", "AVX", "AMX_INT8", "REPACK")


@pytest.fixture
def fake_4090(fake_tool) -> None:
    """An `nvidia-smi` on PATH reporting one RTX 4090 (NVML is not installed in the test environment)."""
    fake_tool("nvidia-smi", "NVIDIA GeForce RTX 4090, 24564, 1024")


needs_cpu_build = pytest.mark.skipif(llama_lib.gpu_offload(), reason="this llama.cpp build can offload")


@pytest.mark.slow
@needs_cpu_build
def test_gpu_placement_on_a_cpu_build_stops_with_the_fix(dsv4, fake_4090: None, tiny_gguf: Path) -> None:
    """`chat --vram` and a detected GPU both refuse to run silently on the CPU; `--cpu` runs on purpose."""
    for extra in (["--vram", "24"], []):
        res = dsv4("chat", str(tiny_gguf), *extra, "-p", "Hello", "--max-tokens", "4")
        assert res.code == 1, res.stderr
        [line] = res.stderr.strip().splitlines()
        assert "CPU-only" in line and '-DGGML_CUDA=on" pip install --force-reinstall' in line and "--cpu" in line
    ran = subprocess.run(
        [sys.executable, "-m", "dsv4cli", "chat", str(tiny_gguf), "--cpu", "-p", "Hi", "--max-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=180,
        env=os.environ,
    )
    assert ran.returncode == 0, ran.stderr
    res = dsv4("plan", str(tiny_gguf), "--json")
    warnings = json.loads(res.stdout)["warnings"]
    assert any("CPU-only" in w and "make setup GPU=cuda" in w for w in warnings), warnings


@needs_cpu_build
def test_rocm_gpu_names_the_hip_build(dsv4, fake_tool) -> None:
    cards = {"card0": {"Card Series": "Radeon RX 7900 XTX", "VRAM Total Memory (B)": str(24 * 2**30),
                       "VRAM Total Used Memory (B)": str(2**30)}}  # fmt: skip
    fake_tool("rocm-smi", json.dumps(cards))
    res = dsv4("plan", "tiny", "--json")
    plan = json.loads(res.stdout)
    assert plan["inputs"]["vram_source"] == "rocm-smi"
    assert plan["tiers"][0]["device"] == "Radeon RX 7900 XTX"
    assert plan["tiers"][0]["budget_bytes"] == 23 * 2**30
    assert any("make setup GPU=rocm" in w and "-DGGML_HIP=on" in w for w in plan["warnings"])


def test_llama_args_carry_the_repack_choice(dsv4, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan decides once: its "llama" section (what chat loads) and its llama-server flags agree."""
    monkeypatch.setenv("DSV4_REPACK", "off")
    assert "--no-repack" in dsv4("plan", "tiny", "--llama-args").stdout
    plan = json.loads(dsv4("plan", "tiny", "--json").stdout)
    assert plan["llama"]["use_extra_bufts"] is False and "--no-repack" in plan["llama_args"]
    monkeypatch.setenv("DSV4_REPACK", "on")
    assert "--no-repack" not in dsv4("plan", "tiny", "--llama-args").stdout


LLAMA_CLASS = """
import sys
from llama_cpp import Llama
from dsv4cli.system.llama_lib import apply_to_llama_class
apply_to_llama_class()
apply_to_llama_class()  # idempotent
llm = Llama(sys.argv[1], n_ctx=256, n_threads=2, verbose=True)
llm.create_completion("Hi", max_tokens=4, temperature=0)
"""


@pytest.mark.slow
def test_llama_class_follows_the_repack_choice(tiny_gguf: Path) -> None:
    """Reference scripts that load through `Llama(...)` get the same buffer types as dsv4 chat."""
    for setting in ("on", "off"):
        res = run_python(LLAMA_CLASS, str(tiny_gguf), env={"DSV4_REPACK": setting})
        if _aborted_as_amx_does(res, setting):
            continue
        assert res.returncode == 0, res.stderr[-2000:]
        repacked = "CPU_REPACK model buffer size" in res.stderr
        assert repacked == (setting == "on" and "CPU_REPACK" in llama_lib.extra_buffer_types())
