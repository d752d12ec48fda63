"""`dsv4 doctor`: its facts checked against independent sources (/proc, statvfs, a fake nvidia-smi)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def meminfo_bytes(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo."""
    cores, block = set(), {}
    for line in [*Path("/proc/cpuinfo").read_text().splitlines(), ""]:
        key, _, value = (part.strip() for part in line.partition(":"))
        if not key:
            if block:
                cores.add((block.get("physical id"), block.get("core id", block.get("processor"))))
            block = {}
        else:
            block[key] = value
    return len(cores)


linux = pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads /proc")


@pytest.mark.slow
@linux
def test_facts_match_proc_and_statvfs_and_bandwidth_is_cached(dsv4, isolated_env: Path) -> None:
    res = dsv4("doctor", "--json")
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ram"]["total_bytes"] == meminfo_bytes("MemTotal")
    assert abs(report["ram"]["available_bytes"] - meminfo_bytes("MemAvailable")) < 2 * 2**30
    st = os.statvfs(isolated_env)
    assert abs(report["disk"]["free_bytes"] - st.f_bavail * st.f_frsize) < 2 * 2**30
    assert report["disk"]["home"] == str(isolated_env)
    assert report["cpu"]["physical_cores"] == physical_cores()
    flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
    assert set(report["cpu"]["features"]) <= flags
    assert ("avx2" in flags) == ("avx2" in report["cpu"]["features"])
    llama = report["llama"]
    if "AVX2" in llama["cpu_features"]:  # what the build uses, the CPU must have
        assert "avx2" in flags
    assert llama["gpu_offload"] == any(b not in ("CPU", "BLAS") for b in llama["backends"])

    bw = report["bandwidth"]
    assert bw["ram_gbs"] > 0.5 and bw["disk_gbs"] > 0.01 and bw["cached"] is False
    assert json.loads((isolated_env / "machine.json").read_text())["ram_gbs"] == bw["ram_gbs"]
    again = json.loads(dsv4("doctor", "--json").stdout)["bandwidth"]
    assert again == {**bw, "cached": True}
    fresh = json.loads(dsv4("doctor", "--json", "--remeasure").stdout)["bandwidth"]
    assert fresh["cached"] is False and fresh["measured_at"] > bw["measured_at"]


def test_gpus_and_the_cpu_only_build_problem(dsv4, isolated_env: Path, fake_tool) -> None:
    from dsv4cli.system import llama_lib
    from dsv4cli.system.hardware import machine_id

    fake_tool("nvidia-smi", "NVIDIA GeForce RTX 4090, 24564, 1024\nNVIDIA RTX A6000, 49140, 0")
    isolated_env.mkdir(parents=True)  # bandwidths as if measured before: this test is about GPUs
    cached = {"ram_gbs": 20.0, "disk_gbs": 2.0, "folder": str(isolated_env), "machine": machine_id(), "measured_at": 1}
    (isolated_env / "machine.json").write_text(json.dumps(cached))
    res = dsv4("doctor", "--json")
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["gpu_source"] == "nvidia-smi"
    assert [(g["name"], g["free_bytes"]) for g in report["gpus"]] == [
        ("NVIDIA GeForce RTX 4090", (24564 - 1024) * 2**20),
        ("NVIDIA RTX A6000", 49140 * 2**20),
    ]
    fixes = [p["fix"] for p in report["problems"]]
    if not llama_lib.gpu_offload():
        assert report["llama"]["gpu_offload"] is False
        assert any("make setup GPU=cuda" in f and "-DGGML_CUDA=on" in f for f in fixes), fixes
    assert report["bandwidth"] == {**cached, "cached": True}
    text = dsv4("doctor").stdout
    assert "RTX A6000" in text and "GPU offload" in text and "RAM 20.0 GB/s, disk 2.0 GB/s (cached)" in text


@pytest.mark.slow
def test_reports_the_serve_engine_or_how_to_build_it(
    dsv4, isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSV4_ENGINE_CACHE", str(tmp_path / "no-engines"))
    res = dsv4("doctor")
    assert res.code == 0, res.stderr
    assert "llama-server    llama-server is not built yet: run `dsv4 engine build`" in res.stdout
    fake = tmp_path / "llama-server"  # a user's own build, named by $DSV4_ENGINE_BIN
    fake.write_text("#!/bin/sh\necho 'version: 4242 (abcdef0)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("DSV4_ENGINE_BIN", str(fake))
    engine = json.loads(dsv4("doctor", "--json").stdout)["engine"]
    assert engine == {"server": str(fake), "version": "4242 (abcdef0)", "gpu": None}
