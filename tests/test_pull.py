"""`dsv4 pull` against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py), through HF_ENDPOINT.

The served repo is the tiny checkpoint (safetensors shards as LFS files, JSON files as plain git blobs). The
expectations are the served files themselves: every test compares what landed on disk byte for byte with
the repo folder, and reads the server's request log to see how the bytes were asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dsv4cli.hub.pull import PARTIAL_DIR
from dsv4cli.models.local import LOCK_NAME, MANIFEST_NAME
from tests.hub_server import HubServer, published

REPO = "test-org/tiny"
SHARD = "model-00002-of-00007.safetensors"
OTHER_SHARD = "model-00003-of-00007.safetensors"


@pytest.fixture(scope="session")
def repo_dir(tiny_checkpoint: Path) -> Path:
    assert (tiny_checkpoint / SHARD).stat().st_size > 1_000_000  # room for the offsets used below
    return tiny_checkpoint


@pytest.fixture(scope="session")
def cut(repo_dir: Path) -> int:
    """A byte offset in the middle of SHARD."""
    return (repo_dir / SHARD).stat().st_size // 2


@pytest.fixture
def hub(repo_dir: Path, monkeypatch: pytest.MonkeyPatch):
    with published(repo_dir, REPO, monkeypatch) as server:
        yield server


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "out"


def served_files(repo_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(repo_dir).as_posix(): p.read_bytes() for p in repo_dir.rglob("*") if p.is_file()}


def pulled_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (MANIFEST_NAME, LOCK_NAME)
    }


def file_requests(hub: HubServer) -> int:
    """Requests for file bytes (HEAD or GET on /resolve/) the server has seen so far."""
    return sum("/resolve/" in r.path for r in hub.log)


def assert_complete(folder: Path, repo_dir: Path, hub: HubServer) -> None:
    assert pulled_files(folder) == served_files(repo_dir)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["repo"] == REPO and manifest["revision"] == hub.commit
    expected = {p: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in served_files(repo_dir).items()}
    assert manifest["files"] == expected
    assert not (folder / PARTIAL_DIR).exists()


def test_complete_download_is_verified(dsv4, hub, repo_dir, target):
    result = dsv4("pull", REPO, "--dir", str(target), "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (
        summary["verified"] == len(served_files(repo_dir))
        and summary["mismatched"] == []
        and summary["refetched"] == []
    )
    assert summary["downloaded_bytes"] == sum(len(b) for b in served_files(repo_dir).values())
    assert_complete(target, repo_dir, hub)


def test_second_pull_downloads_nothing(dsv4, hub, repo_dir, target):
    assert dsv4("pull", REPO, "--dir", str(target)).code == 0
    gets = file_requests(hub)
    result = dsv4("pull", REPO, "--dir", str(target), "--json")
    assert result.code == 0
    assert json.loads(result.stdout)["downloaded_bytes"] == 0
    assert file_requests(hub) == gets


def test_dropped_connection_resumes_with_range(dsv4, hub, repo_dir, target, cut):
    hub.faults.drop_after[SHARD] = cut
    result = dsv4("pull", REPO, "--dir", str(target))
    assert result.code == 0, result.stderr
    assert [r.range for r in hub.requests_for(SHARD)] == [None, f"bytes={cut}-"]
    assert_complete(target, repo_dir, hub)


@pytest.mark.slow
def test_partial_file_resumes_in_a_new_process(hub, repo_dir, target, python, cut):
    """huggingface_hub 2.4.0 restarts such a file from byte 0; we continue from the last byte."""
    part = target / PARTIAL_DIR / f"{SHARD}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes((repo_dir / SHARD).read_bytes()[:cut])
    run = subprocess.run(
        [python, "-m", "dsv4cli", "pull", REPO, "--dir", str(target)], capture_output=True, text=True, env=os.environ
    )
    assert run.returncode == 0, run.stderr
    assert [r.range for r in hub.requests_for(SHARD)] == [f"bytes={cut}-"]
    assert_complete(target, repo_dir, hub)


def test_server_ignoring_range_restarts_cleanly(dsv4, hub, repo_dir, target, cut):
    part = target / PARTIAL_DIR / f"{SHARD}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes((repo_dir / SHARD).read_bytes()[:cut])
    hub.faults.ignore_range = True
    assert dsv4("pull", REPO, "--dir", str(target)).code == 0
    assert_complete(target, repo_dir, hub)


def test_corrupted_download_is_named_and_fetched_again(dsv4, hub, repo_dir, target):
    hub.faults.corrupt[SHARD] = 1
    hub.faults.corrupt["config.json"] = 1  # a plain git file: caught by its blob sha1
    result = dsv4("pull", REPO, "--dir", str(target), "--json")
    assert result.code == 0, result.stderr
    assert f"{SHARD}: download does not match the Hub (sha256" in result.stderr
    assert "config.json: download does not match the Hub (git sha1" in result.stderr
    assert sorted(json.loads(result.stdout)["refetched"]) == ["config.json", SHARD]
    assert len(hub.requests_for(SHARD)) == 2
    assert_complete(target, repo_dir, hub)


def test_file_corrupted_every_time_fails_loudly(dsv4, hub, repo_dir, target):
    hub.faults.corrupt[SHARD] = 2
    result = dsv4("pull", REPO, "--dir", str(target))
    assert result.code == 1
    assert f"error: {SHARD}: fetched twice and still does not match the Hub" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (target / SHARD).exists() and not (target / MANIFEST_NAME).exists()


def test_503_is_retried(dsv4, hub, repo_dir, target):
    hub.faults.unavailable = 3
    assert dsv4("pull", REPO, "--dir", str(target)).code == 0
    assert sum(r.status == 503 for r in hub.log) == 3
    assert_complete(target, repo_dir, hub)


def test_dry_run_sizes_are_exact(dsv4, hub, repo_dir, target, cut):
    part = target / PARTIAL_DIR / f"{SHARD}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * cut)
    result = dsv4("pull", REPO, "--dir", str(target), "--dry-run", "--json")
    assert result.code == 0, result.stderr
    plan = json.loads(result.stdout)
    sizes = {p: len(b) for p, b in served_files(repo_dir).items()}
    assert {f["path"]: f["size"] for f in plan["files"]} == sizes
    assert plan["total_bytes"] == sum(sizes.values())
    assert plan["remaining_bytes"] == sum(sizes.values()) - cut
    assert plan["free_bytes"] > 0
    assert sorted(p.name for p in target.iterdir()) == [PARTIAL_DIR]
    assert file_requests(hub) == 0


def test_include_and_exclude_select_files(dsv4, hub, repo_dir, target):
    result = dsv4("pull", REPO, "--dir", str(target), "--include", "*.json", "--exclude", "model.*", "--json")
    assert result.code == 0, result.stderr
    expected = sorted(p for p in served_files(repo_dir) if p.endswith(".json") and not p.startswith("model."))
    assert "config.json" in expected
    assert sorted(pulled_files(target)) == expected
    assert sorted(json.loads((target / MANIFEST_NAME).read_text())["files"]) == expected


def test_verify_finds_a_file_corrupted_on_disk(dsv4, hub, repo_dir, target):
    assert dsv4("pull", REPO, "--dir", str(target)).code == 0
    assert dsv4("pull", REPO, "--dir", str(target), "--verify").code == 0
    shard = target / OTHER_SHARD
    data = bytearray(shard.read_bytes())
    data[123] ^= 1
    shard.write_bytes(bytes(data))
    gets = file_requests(hub)
    result = dsv4("pull", REPO, "--dir", str(target), "--verify")
    assert result.code == 1
    assert OTHER_SHARD in result.stderr.splitlines()[-1]
    assert file_requests(hub) == gets  # --verify downloads nothing
    assert dsv4("pull", REPO, "--dir", str(target)).code == 0  # a plain pull repairs it
    assert_complete(target, repo_dir, hub)


def test_401_says_to_set_hf_token(dsv4, hub, repo_dir, target, monkeypatch):
    hub.faults.token = "hf_secret"
    result = dsv4("pull", REPO, "--dir", str(target))
    assert result.code == 1
    assert result.stderr.count("\n") == 1 and "HF_TOKEN" in result.stderr and "licence" in result.stderr
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert dsv4("pull", REPO, "--dir", str(target)).code == 0
    assert_complete(target, repo_dir, hub)


def test_unknown_name_suggests_registry_names(dsv4):
    result = dsv4("pull", "deepseek-v4-flsh")
    assert result.code == 1
    assert result.stderr.startswith("error: unknown model 'deepseek-v4-flsh'") and "deepseek-v4-flash" in result.stderr


def test_repo_and_revision_not_found(dsv4, hub, target):
    result = dsv4("pull", "test-org/nope", "--dir", str(target))
    assert result.code == 1 and "repo 'test-org/nope' not found" in result.stderr
    result = dsv4("pull", REPO, "--revision", "v9", "--dir", str(target))
    assert result.code == 1 and "revision 'v9' not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_network_keeps_partial_files(dsv4, monkeypatch, target):
    monkeypatch.setenv("DSV4_RETRY_BASE", "0.01")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    result = dsv4("pull", REPO, "--dir", str(target))
    assert result.code == 1
    assert result.stderr.count("\n") == 1 and "partial files are kept" in result.stderr


def test_refuses_to_start_without_disk_space(dsv4, hub, repo_dir, target):
    hub.entries[SHARD] = dataclasses.replace(hub.entries[SHARD], size=1 << 48)  # announce 256 TiB
    result = dsv4("pull", REPO, "--dir", str(target))
    assert result.code == 1
    remaining = sum(len(b) for b in served_files(repo_dir).values()) - (repo_dir / SHARD).stat().st_size + (1 << 48)
    assert "not enough free disk" in result.stderr and f"({remaining} bytes) left to download" in result.stderr
    assert file_requests(hub) == 0


@pytest.mark.slow
def test_ctrl_c_keeps_partial_files_and_a_rerun_resumes(dsv4, hub, repo_dir, target, python):
    hub.faults.bytes_per_second = 2_000_000
    child = subprocess.Popen(
        [python, "-m", "dsv4cli", "pull", REPO, "--dir", str(target), "--workers", "1", "--include", SHARD],
        env=os.environ,
        stderr=subprocess.PIPE,
        text=True,
    )
    part = target / PARTIAL_DIR / f"{SHARD}.part"
    deadline = time.monotonic() + 30
    while not (part.is_file() and part.stat().st_size > 100_000) and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    kept = part.stat().st_size
    assert 0 < kept < (repo_dir / SHARD).stat().st_size and not (target / SHARD).exists()
    hub.faults.bytes_per_second = None
    assert dsv4("pull", REPO, "--dir", str(target)).code == 0
    assert hub.requests_for(SHARD)[-1].range == f"bytes={kept}-"
    assert_complete(target, repo_dir, hub)


@pytest.mark.slow
def test_builtin_model_is_written_offline_with_a_manifest(dsv4, tiny_checkpoint, monkeypatch, isolated_env):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    result = dsv4("pull", "tiny", "--json")
    assert result.code == 0, result.stderr
    folder = isolated_env / "models" / "tiny"
    assert pulled_files(folder) == served_files(tiny_checkpoint)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == sorted(served_files(tiny_checkpoint))
    assert json.loads(result.stdout)["verified"] == len(manifest["files"])
    assert dsv4("pull", "tiny", "--verify").code == 0
    (folder / "config.json").write_text("{}")
    result = dsv4("pull", "tiny", "--verify")
    assert result.code == 1 and "config.json" in result.stderr
    assert dsv4("pull", "tiny").code == 0  # writes it again
    assert pulled_files(folder) == served_files(tiny_checkpoint)


def test_offline_mode_refuses_hub_downloads(dsv4, hub, target, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = dsv4("pull", REPO, "--dir", str(target))
    assert result.code == 1 and "HF_HUB_OFFLINE" in result.stderr
    assert not hub.log


def test_builtin_model_never_replaces_a_foreign_folder(dsv4, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = dsv4("pull", "tiny", "--dir", str(tmp_path))
    assert result.code == 1 and "not written by `dsv4 pull`" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
