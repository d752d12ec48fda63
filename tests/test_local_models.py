"""`dsv4 list`, `show` and `rm` on a home holding one model of each kind: a registry checkpoint (`tiny`, written
offline), a GGUF converted by `dsv4 quantize`, a pre-quantized GGUF repo pulled by tag, an unfinished download.
The expectations are the files put there: their sizes, and the recipe and tensors their headers were written with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from pull_lock import hold_pull_lock

from tests.conftest import GGUF_REPO, GGUF_TAG

TAGGED = f"{GGUF_REPO}:{GGUF_TAG}"


@pytest.fixture
def home(dsv4, gguf_hub, tiny_gguf: Path, isolated_env: Path) -> Path:
    assert dsv4("pull", "tiny").code == 0
    assert dsv4("pull", f"{GGUF_REPO}:{GGUF_TAG.lower()}").code == 0
    gguf = isolated_env / "gguf"
    gguf.mkdir()
    shutil.copy(tiny_gguf, gguf / tiny_gguf.name)
    shutil.copy(tiny_gguf.with_name(tiny_gguf.name + ".report.json"), gguf / (tiny_gguf.name + ".report.json"))
    partial = isolated_env / "models" / "other-org--half" / ".dsv4-partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors.part").write_bytes(b"x" * 1000)
    return isolated_env


def listed(dsv4) -> dict[str, dict]:
    result = dsv4("list", "--json")
    assert result.code == 0, result.stderr
    return {m["name"]: m for m in json.loads(result.stdout)}


def test_list_shows_one_of_each_kind_with_recipe_and_size(dsv4, home, gguf_repo_dir, tiny_gguf) -> None:
    models = listed(dsv4)
    assert {n: (m["kind"], m["state"]) for n, m in models.items()} == {
        "tiny": ("checkpoint", "complete"),
        TAGGED: ("gguf-repo", "complete"),
        "other-org/half": ("download", "partial"),
        tiny_gguf.name: ("gguf", "complete"),
    }
    shards = sorted((gguf_repo_dir / GGUF_TAG).glob("*.gguf"))
    assert models[TAGGED]["bytes"] == sum(p.stat().st_size for p in shards)
    assert [Path(f).name for f in models[TAGGED]["files"]] == [p.name for p in shards]
    assert models[TAGGED]["recipe"] == models[tiny_gguf.name]["recipe"] == {"experts": "mxfp4", "dense": "q8_0"}
    assert models[tiny_gguf.name]["bytes"] == tiny_gguf.stat().st_size
    assert models["other-org/half"]["bytes"] == 1000
    plain = dsv4("ls")
    assert plain.code == 0 and "(partial)" in plain.stdout and TAGGED in plain.stdout


def test_show_reports_classes_files_error_summary_and_source(dsv4, home, gguf_repo_dir) -> None:
    from dsv4cli.gguf_io.read import read_header

    result = dsv4("show", TAGGED, "--json")
    assert result.code == 0, result.stderr
    info = json.loads(result.stdout)
    shards = sorted((gguf_repo_dir / GGUF_TAG).glob("*.gguf"))
    header = read_header(shards[0])
    assert info["arch"] == "deepseek4" and info["dims"]["num_hidden_layers"] == 4
    assert info["bytes"] == sum(t.nbytes for t in header.tensors)
    assert sum(c["bytes"] for c in info["classes"].values()) == info["bytes"]
    assert info["classes"]["routed_experts"]["types"] == {"MXFP4": info["classes"]["routed_experts"]["bytes"]}
    assert [Path(f["path"]).name for f in info["files"]] == [p.name for p in shards]
    assert info["chat_template"] is True and info["expert_error_summary"]["experts"] > 0
    assert info["repo"] == GGUF_REPO and info["source"] == header.fields["dsv4.source"]
    text = dsv4("show", TAGGED)
    assert text.code == 0 and "routed_experts" in text.stdout and "chat template: yes" in text.stdout


def test_a_quant_another_tool_made_from_ours_shows_no_dsv4_recipe(dsv4, tiny_gguf: Path, tmp_path: Path) -> None:
    """llama-quantize copies its input's dsv4.* keys (recipe, expert error, fit) and sets its own file type (Q2_K:
    10 in llama.h): show and list must not report dsv4's recipe or error summary for the quant it wrote."""
    from tests.test_chat_gguf_check import rewrite

    other = rewrite(tiny_gguf, tmp_path / "other-Q2_K.gguf", set_={"general.file_type": 10})
    info = json.loads(dsv4("show", str(other), "--json").stdout)
    assert info["recipe"] is None and info["expert_error_summary"] is None and info["fit"] is None
    assert info["chat_template"] is True
    ours = json.loads(dsv4("show", str(tiny_gguf), "--json").stdout)
    assert ours["recipe"] == {"experts": "mxfp4", "dense": "q8_0"} and ours["expert_error_summary"] is not None


def test_rm_removes_each_kind_and_list_follows(dsv4, home, tiny_gguf) -> None:
    for name in (TAGGED, "other-org/half", tiny_gguf.name, "tiny"):
        result = dsv4("rm", name, "--yes")
        assert result.code == 0, result.stderr
        assert name not in listed(dsv4)
    assert listed(dsv4) == {}
    assert not (home / "models" / "test-org--tiny-GGUF").exists()
    assert not (home / "gguf" / (tiny_gguf.name + ".report.json")).exists()


def test_rm_without_yes_and_without_a_terminal_asks_for_it(dsv4, home) -> None:
    result = dsv4("rm", "tiny")
    assert result.code == 1 and "--yes" in result.stderr
    assert "tiny" in listed(dsv4)


def test_rm_refuses_what_is_outside_the_home(dsv4, home, tmp_path) -> None:
    outside = tmp_path / "mine.gguf"
    outside.write_bytes(b"GGUF")
    link = home / "gguf" / "linked.gguf"
    link.symlink_to(outside)
    for target in (str(outside), str(link)):
        result = dsv4("rm", target, "--yes")
        assert result.code == 1 and "outside the dsv4 home" in result.stderr, result.stderr
    assert outside.read_bytes() == b"GGUF"


def test_rm_refuses_a_model_a_running_server_holds(dsv4, home) -> None:
    model = listed(dsv4)[TAGGED]
    run = home / "run"
    run.mkdir()
    started = psutil.Process().create_time()
    record = {"pid": os.getpid(), "started": started, "files": [model["files"][0]], "url": "http://x", "model": TAGGED}
    (run / f"serve-{os.getpid()}.json").write_text(json.dumps(record))
    result = dsv4("rm", TAGGED, "--yes")
    assert result.code == 1 and f"in use by dsv4 serve (pid {os.getpid()}" in result.stderr
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    (run / f"serve-{os.getpid()}.json").unlink()
    (run / f"serve-{dead}.json").write_text(json.dumps({**record, "pid": dead}))
    assert dsv4("rm", TAGGED, "--yes").code == 0  # a stale record (dead pid) holds nothing


@pytest.mark.slow
def test_rm_waits_for_a_running_pull_of_the_folder(home) -> None:
    folder = home / "models" / "test-org--tiny-GGUF"
    holder = hold_pull_lock(sys.executable, folder)
    rm = subprocess.Popen(
        [sys.executable, "-m", "dsv4cli", "rm", TAGGED, "--yes"], stderr=subprocess.PIPE, text=True, env=os.environ
    )
    assert "in use by another `dsv4 pull`" in rm.stderr.readline()
    assert folder.is_dir() and rm.poll() is None  # nothing deleted while the pull runs
    holder.communicate("\n", timeout=30)
    assert rm.wait(timeout=60) == 0
    assert not folder.exists()


def test_a_split_set_missing_a_shard_is_listed_and_removable(dsv4, gguf_repo_dir, isolated_env) -> None:
    gguf = isolated_env / "gguf"
    gguf.mkdir(parents=True)
    shards = sorted((gguf_repo_dir / GGUF_TAG).glob("*.gguf"))
    for shard in shards[:-1]:
        shutil.copy(shard, gguf / shard.name)
    models = listed(dsv4)
    assert list(models) == [shards[0].name]
    assert models[shards[0].name]["bytes"] == sum(p.stat().st_size for p in shards[:-1])
    assert dsv4("rm", shards[0].name, "--yes").code == 0
    assert list(gguf.iterdir()) == []
