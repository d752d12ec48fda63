"""Pre-quantized GGUF repos: `dsv4 pull REPO:TAG` (llama.cpp's `-hf repo:quant` matching), chat/plan by the same
name, and `dsv4 plan REPO:TAG` before the download from the headers alone (HTTP range requests).

The test Hub publishes the tiny model as a GGUF repo: a split set in a tag folder (as unsloth lays out its
dynamic quants) and a single-file Q8_0 beside it; the expectations are those files themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4cli.errors import IntegrityError, UsageError
from dsv4cli.hub.gguf_repo import select_quant
from tests.conftest import GGUF_REPO as REPO
from tests.conftest import GGUF_TAG as TAG
from tests.hub_server import published


def shards(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / TAG).glob("*.gguf"))


def test_tag_matching_follows_llama_cpp() -> None:
    files = [
        "README.md",
        "UD-Q2_K_XL/M-UD-Q2_K_XL-00002-of-00002.gguf",
        "UD-Q2_K_XL/M-UD-Q2_K_XL-00001-of-00002.gguf",
        "M-Q8_0.gguf",
        "M-Q4_K_M.gguf",
        "mmproj-M-Q4_K_M.gguf",
    ]
    assert select_quant(files, "ud-q2_k_xl", repo="r") == [
        "UD-Q2_K_XL/M-UD-Q2_K_XL-00001-of-00002.gguf",
        "UD-Q2_K_XL/M-UD-Q2_K_XL-00002-of-00002.gguf",
    ]
    assert select_quant(files, None, repo="r") == ["M-Q4_K_M.gguf"]  # the default, never the projector
    assert select_quant(files[:4], None, repo="r") == ["M-Q8_0.gguf"]
    assert select_quant(["b.gguf", "a.gguf"], None, repo="r") == ["a.gguf"]
    with pytest.raises(UsageError, match="no GGUF matches the tag 'Q5_K_M'"):
        select_quant(files, "Q5_K_M", repo="r")
    with pytest.raises(IntegrityError, match="one of 3 shards but the repo lists 2"):
        select_quant(["x-Q4_K_M-00001-of-00003.gguf", "x-Q4_K_M-00003-of-00003.gguf"], "Q4_K_M", repo="r")


def test_plan_before_download_reads_only_headers_and_equals_the_plan_on_disk(dsv4, gguf_hub, gguf_repo_dir) -> None:
    args = ("--vram", "0.01", "--ram", "64", "--ctx", "4096", "--json")
    remote = dsv4("plan", f"{REPO}:{TAG.lower()}", *args)
    assert remote.code == 0, remote.stderr
    remote_plan = json.loads(remote.stdout)
    import gguf

    sizes = {p: (gguf_repo_dir / p).stat().st_size for p in shards(gguf_repo_dir)}
    headers = {p: gguf.GGUFReader(gguf_repo_dir / p).data_offset for p in sizes}  # where each shard's data starts
    fetched = remote_plan["source"]["fetched_bytes"]
    assert remote_plan["source"]["download_bytes"] == sum(sizes.values())
    # Header bytes, not data: at most each header plus one read-ahead chunk (1 MiB) of the tiny shards (bench/
    # remote_plan.py measures a real-sized V4-Flash set: 8 MB of a 156 GB download).
    assert sum(headers.values()) <= fetched <= sum(min(sizes[p], headers[p] + (1 << 20)) for p in sizes)
    assert fetched < sum(sizes.values()) / 2
    ranged = [r for r in gguf_hub.log if "/resolve/" in r.path]
    assert {r.path.rsplit("/", 1)[-1] for r in ranged} == {p.rsplit("/", 1)[-1] for p in shards(gguf_repo_dir)}
    assert all(r.range for r in ranged)  # every read was a range request

    assert dsv4("pull", f"{REPO}:{TAG}").code == 0
    local = dsv4("plan", f"{REPO}:{TAG}", *args)
    assert local.code == 0, local.stderr
    local_plan = json.loads(local.stdout)
    assert local_plan["source"]["kind"] == "gguf" and local_plan["source"]["fetched_bytes"] is None
    assert Path(local_plan["source"]["files"][0]).is_file()
    for plan in (remote_plan, local_plan):
        plan["source"] = {
            k: v for k, v in plan["source"].items() if k not in ("kind", "fetched_bytes", "download_bytes")
        }
    assert remote_plan == local_plan


def test_plan_stops_at_the_fetch_budget(gguf_hub) -> None:
    from dsv4cli.errors import PlanError
    from dsv4cli.hub.remote_file import FetchBudget
    from dsv4cli.models.registry import get_model
    from dsv4cli.plan.remote import remote_source

    with pytest.raises(PlanError, match="would fetch more than 1000 bytes"):
        remote_source(get_model(REPO), TAG, budget=FetchBudget(limit=1000))


@pytest.mark.slow
def test_pull_by_tag_then_chat_by_the_same_name(dsv4, gguf_hub, gguf_repo_dir, isolated_env) -> None:
    result = dsv4("pull", f"{REPO}:{TAG.lower()}", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert sorted(f["path"] for f in summary["files"]) == shards(gguf_repo_dir)  # only the tag's shards
    folder = Path(summary["folder"])
    assert folder == isolated_env / "models" / "test-org--tiny-GGUF"
    for rel in shards(gguf_repo_dir):
        assert (folder / rel).read_bytes() == (gguf_repo_dir / rel).read_bytes()
    assert not (folder / "tiny-Q8_0.gguf").exists()

    run = subprocess.run(
        [sys.executable, "-m", "dsv4cli", "chat", f"{REPO}:{TAG}", "-p", "Hi", "--max-tokens", "4", "--temp", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    assert run.returncode == 0, run.stderr
    assert "prompt tokens" in run.stderr

    from dsv4cli.load.placement import Placement
    from dsv4cli.load.prepared import prepare_model
    from dsv4cli.models.ref import resolve_model

    served = prepare_model(resolve_model(f"{REPO}:{TAG.lower()}"), Placement(cpu=True), note=print)  # serve's resolver
    assert served.gguf == folder / shards(gguf_repo_dir)[0] and served.llama_args[:2] == ["-m", str(served.gguf)]

    missing = dsv4("chat", f"{REPO}:Q8_0", "-p", "Hi")
    assert missing.code == 1 and f"run `dsv4 pull {REPO}:Q8_0`" in missing.stderr


def test_registry_gguf_repos_make_a_tag_of_a_model_name(dsv4, gguf_hub, isolated_env) -> None:
    isolated_env.mkdir(parents=True, exist_ok=True)
    (isolated_env / "models.toml").write_text(f'[models.tiny-hub]\nrepo = "test-org/tiny"\ngguf_repos = ["{REPO}"]\n')
    result = dsv4("pull", "tiny-hub:q8_0", "--json")
    assert result.code == 0, result.stderr
    assert [f["path"] for f in json.loads(result.stdout)["files"]] == ["tiny-Q8_0.gguf"]
    from dsv4cli.hub.gguf_repo import find_local
    from dsv4cli.models.registry import get_model

    found = find_local(get_model("tiny-hub"), "Q8_0")
    assert found == isolated_env / "models" / "test-org--tiny-GGUF" / "tiny-Q8_0.gguf"
    wrong = dsv4("pull", "tiny-hub:Q5_K_M")
    assert wrong.code == 1 and "no GGUF matches the tag 'Q5_K_M'" in wrong.stderr


def test_a_tag_on_a_builtin_model_is_refused_as_plan_and_show_refuse_it(dsv4, isolated_env) -> None:
    for command in ("pull", "plan", "show"):
        result = dsv4(command, "tiny:Q4_K_M")
        assert result.code == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "tiny: a tag picks a pre-quantized GGUF, and this model names no GGUF repo" in result.stderr
    assert not (isolated_env / "models").exists()


def test_unreachable_hub_before_download_is_not_called_a_partial_pull(dsv4, monkeypatch) -> None:
    monkeypatch.setenv("DSV4_RETRY_BASE", "0.01")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    for command in ("plan", "show"):
        result = dsv4(command, f"{REPO}:Q8_0")
        assert result.code == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "nothing was downloaded" in result.stderr and "partial files are kept" not in result.stderr


def test_gguf_of_another_architecture_is_one_line_at_pull_end(dsv4, tmp_path, monkeypatch) -> None:
    import gguf

    root = tmp_path / "repo"
    root.mkdir()
    writer = gguf.GGUFWriter(root / "other-Q4_K_M.gguf", "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with published(root, "other/llama-GGUF", monkeypatch):
        result = dsv4("pull", "other/llama-GGUF")
    assert result.code == 1
    assert "downloaded, but" in result.stderr and "llama" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plan_refuses_a_server_that_ignores_ranges(dsv4, gguf_hub) -> None:
    gguf_hub.faults.ignore_range = True
    result = dsv4("plan", f"{REPO}:{TAG}", "--vram", "1")
    assert result.code == 1 and "ignored the byte range" in result.stderr
    assert len([r for r in gguf_hub.log if "/resolve/" in r.path]) == 1  # gave up at once, nothing retried


def test_show_before_download_reads_the_headers(dsv4, gguf_hub) -> None:
    result = dsv4("show", f"{REPO}:{TAG}", "--json")
    assert result.code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kind"] == "remote" and info["fetched_bytes"] > 0 and info["classes"]["routed_experts"]["bytes"] > 0


def test_plan_refuses_a_server_that_sends_more_than_the_range(dsv4, gguf_hub, gguf_repo_dir) -> None:
    first = sorted((gguf_repo_dir / TAG).glob("*.gguf"))[0]
    gguf_hub.faults.oversize[f"{TAG}/{first.name}"] = 4096
    result = dsv4("plan", f"{REPO}:{TAG}", "--vram", "1")
    assert result.code == 1 and "sent more than the" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
