"""`dsv4 rm` removes one model and nothing else, whatever it is pointed at: state folders, the home, `/`, a
manifest naming another model's files, a download in progress, a serve record whose pid was reused, a symlink.

The expectation is the disk itself: every file not belonging to the named model is still there afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from pull_lock import hold_pull_lock


def _manifest(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    entries = {name: {"size": len(data), "sha256": "0" * 64} for name, data in files.items()}
    manifest = {"repo": f"org/{folder.name}", "revision": "r", "files": entries}
    (folder / ".dsv4-pull.json").write_text(json.dumps(manifest))


@pytest.fixture
def home(isolated_env: Path) -> Path:
    """Two pulled checkpoints, `org/victim` and `org/keeper`, and empty state folders beside them."""
    models = isolated_env / "models"
    _manifest(models / "org--victim", {"config.json": b"{}", "sub/model.safetensors": b"v" * 100})
    _manifest(models / "org--keeper", {"config.json": b"{}", "model.safetensors": b"k" * 100})
    for state in ("gguf", "run", "logs"):
        (isolated_env / state).mkdir()
    return isolated_env


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(dsv4, target: str, words: str) -> None:
    result = dsv4("rm", target, "--yes")
    assert result.code == 1, result
    assert words in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result


@pytest.mark.parametrize("where", ["", "models", "gguf", "run", "logs", "models/.."])
def test_the_home_and_its_state_folders_are_refused(dsv4, home: Path, where: str) -> None:
    before = _files(home)
    _refused(dsv4, str(home / where) if where else str(home), "refusing to remove")
    assert _files(home) == before


def test_dot_dot_from_inside_a_model_folder_is_refused(dsv4, home: Path, monkeypatch) -> None:
    monkeypatch.chdir(home / "models" / "org--victim")
    before = _files(home)
    _refused(dsv4, "..", "state folders")
    _refused(dsv4, "sub", "inside the folder of org/victim")  # part of a model, not a model
    _refused(dsv4, "config.json", "inside the folder of org/victim")
    assert _files(home) == before


@pytest.mark.parametrize("target", ["/", "/proc", "/usr", "/etc/passwd"])
def test_system_paths_are_refused_at_once(dsv4, home: Path, target: str) -> None:
    _refused(dsv4, target, "refusing to remove")


def test_a_manifest_naming_another_models_files_touches_neither(dsv4, home: Path) -> None:
    keeper = home / "models" / "org--keeper"
    victim = home / "models" / "org--victim"
    manifest = json.loads((victim / ".dsv4-pull.json").read_text())
    manifest["files"]["../org--keeper/model.safetensors"] = {"size": 100, "sha256": "0" * 64}
    (victim / ".dsv4-pull.json").write_text(json.dumps(manifest))
    listed = {m["name"]: m["state"] for m in json.loads(dsv4("list", "--json").stdout)}
    assert listed == {"org/victim": "damaged", "org/keeper": "complete"}
    _refused(dsv4, "org/victim", "damaged")
    assert (keeper / "model.safetensors").read_bytes() == b"k" * 100 and (victim / "sub").is_dir()


def test_only_the_manifests_files_go_and_a_users_file_stays(dsv4, home: Path) -> None:
    victim = home / "models" / "org--victim"
    (victim / "my-notes.txt").write_text("mine")
    result = dsv4("rm", "org/victim", "--yes")
    assert result.code == 0, result.stderr
    assert "kept 1 entries" in result.stderr and "my-notes.txt" in result.stderr
    assert _files(victim) == {"my-notes.txt", ".dsv4-pull.lock"}
    assert (home / "models" / "org--keeper" / "model.safetensors").exists()
    assert dsv4("rm", "org/keeper", "--yes").code == 0
    assert not (home / "models" / "org--keeper").exists()  # nothing but the model there: the folder goes too


def test_a_symlink_in_the_home_is_refused_not_followed(dsv4, home: Path) -> None:
    target = home / "models" / "org--keeper" / "model.safetensors"
    (home / "gguf" / "link.gguf").symlink_to(target)
    _refused(dsv4, str(home / "gguf" / "link.gguf"), "symlink")
    assert target.exists()


def test_a_download_in_progress_is_refused_at_once(dsv4, home: Path, python: str) -> None:
    folder = home / "models" / "org--half"
    (folder / ".dsv4-partial").mkdir(parents=True)
    (folder / ".dsv4-partial" / "model.safetensors.part").write_bytes(b"x" * 10)
    holder = hold_pull_lock(python, folder)
    try:
        for target in ("org/half", str(folder), str(folder / ".dsv4-partial")):
            _refused(dsv4, target, "downloading into it now")
        assert (folder / ".dsv4-partial" / "model.safetensors.part").exists()
    finally:
        holder.communicate("\n", timeout=30)
    assert dsv4("rm", "org/half", "--yes").code == 0
    assert not folder.exists()


def test_a_serve_record_whose_pid_was_reused_holds_nothing(dsv4, home: Path) -> None:
    run = home / "run"
    files = [str(home / "models" / "org--victim" / "config.json")]
    other = psutil.Process(1)  # alive, but not the process that wrote the record: its start time differs
    (run / "serve-1.json").write_text(json.dumps({"pid": 1, "started": other.create_time() + 5, "files": files}))
    me = psutil.Process()
    (run / f"serve-{me.pid}.json").write_text(json.dumps({"pid": me.pid, "started": 1.0, "files": files}))
    (run / "serve-0.json").write_text(json.dumps({"pid": 0, "started": 0, "files": files}))
    assert dsv4("rm", "org/victim", "--yes").code == 0


def test_a_live_serve_record_still_holds_its_model(dsv4, home: Path) -> None:
    files = [str((home / "models" / "org--victim" / "config.json").resolve())]
    me = psutil.Process()
    record = {"pid": me.pid, "started": me.create_time(), "files": files, "url": "http://\x1b[2Jx"}
    (home / "run" / f"serve-{me.pid}.json").write_text(json.dumps(record))
    result = dsv4("rm", "org/victim", "--yes")
    assert result.code == 1 and f"pid {me.pid}" in result.stderr and "\x1b" not in result.stderr
