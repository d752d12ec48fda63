"""`dsv4 pull` treats a Hub repo, the target folder and the registry as untrusted input.

The served repo is the tiny checkpoint plus whatever a test publishes with `HubServer.add_file` (any name,
any listed fields) or injects with `Faults` (oversized or chunked bodies, a repo that changes right after it
was listed). The expectation is independent of our code: a snapshot of the whole temporary tree (every path,
its type, size and content hash) before and after, so a write anywhere outside the target is caught, whatever
name carried it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from dsv4cli.hub.pull import PARTIAL_DIR
from dsv4cli.models.local import LOCK_NAME, MANIFEST_NAME
from tests import test_pull
from tests.hub_server import HubServer
from tests.mounts import tmpfs
from tests.test_pull import REPO, SHARD, assert_complete, file_requests, served_files

EVIL = b'{"evil": true}\n'


# The served repo and the target folder are those of the well-behaved pull tests.
hub, repo_dir, target = test_pull.hub, test_pull.repo_dir, test_pull.target


def snapshot(root: Path, *, skip: Path | None = None) -> dict[str, tuple[str, int, str]]:
    """Every entry under root (symlinks not followed): kind, size and sha256 of regular files."""
    found: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            st = path.lstat()
            if path.is_symlink():
                found[str(path)] = ("link", 0, os.readlink(path))
            elif path.is_dir():
                found[str(path)] = ("dir", 0, "")
            else:
                found[str(path)] = ("file", st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def one_line_error(result) -> str:
    """The error line of a failed run: exit 1, no traceback, one line besides `warning:` notes."""
    assert result.code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def hostile_names(tmp_path: Path) -> list[str]:
    return [
        str(tmp_path / "abs.txt"),  # absolute, aimed inside the scanned tree
        "../x.txt",
        "sub/../../x.txt",
        "../../../../../../../../../../../tmp/x.txt",
        "./config2.json",
        "a//b.json",
        "a/./b.json",
        "a/.",
        "..",
        "C:/windows.txt",
        "C:drive-relative.txt",
        "\\\\server\\share\\x.txt",
        "sub\\..\\..\\x.txt",
        "nul\x00byte.txt",
        "new\nline.txt",
        "esc\x1b[31m.txt",
        "rtl\u202eexe.txt",
        "del\x7f.txt",
        "x" * 300,
        "/".join(["d"] * 40) + "/f.txt",
        "/".join(["y" * 150] * 8),
        f"{PARTIAL_DIR}/verified.jsonl",
        f"{PARTIAL_DIR}/{SHARD}.part",
        MANIFEST_NAME,
        LOCK_NAME,
        ".DSV4-PULL.JSON",
        "config.json/inner.json",  # a listed file used as a folder
        "CONFIG.JSON",  # the same file on a case-insensitive disk
        "config.json.part/x.json",  # where config.json's partial file goes
        "caf\u00e9.json",  # listed twice: composed here, decomposed below
    ]


@pytest.mark.slow
def test_hostile_names_are_refused_before_anything_is_written(dsv4, hub, tmp_path, target):
    before = snapshot(tmp_path)
    hub.add_file("cafe\u0301.json", EVIL)
    for name in hostile_names(tmp_path):
        hub.add_file(name, EVIL)
        line = one_line_error(dsv4("pull", REPO, "--dir", str(target)))
        assert REPO in line and "refusing file name" in line and "nothing was written" in line, line
        assert snapshot(tmp_path) == before, name
        del hub.entries[name]
    assert file_requests(hub) == 0


@pytest.mark.parametrize(
    "listed",
    [
        {"size": -1},
        {"size": "15"},
        {"size": 1 << 62},
        {"blobId": None},  # a plain git file with nothing to check it against
        {"blobId": "../../etc"},
        {"lfs": {"size": 15, "sha256": "not-a-sha", "pointerSize": 134}},
    ],
)
def test_malformed_listing_fields_are_refused(dsv4, hub, tmp_path, target, listed):
    hub.add_file("extra.json", EVIL, lfs=False, listed=listed)
    before = snapshot(tmp_path)
    line = one_line_error(dsv4("pull", REPO, "--dir", str(target)))
    assert "extra.json" in line and REPO in line
    assert snapshot(tmp_path) == before and file_requests(hub) == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_an_integrity_error_and_never_written(dsv4, hub, tmp_path, target, chunked):
    hub.faults.oversize[SHARD] = 20 << 20
    hub.faults.chunked = chunked
    outside = snapshot(tmp_path, skip=target)
    line = one_line_error(dsv4("pull", REPO, "--dir", str(target), "--workers", "1"))
    assert SHARD in line and "the listing says" in line, line
    assert not (target / SHARD).exists() and not (target / PARTIAL_DIR / f"{SHARD}.part").exists()
    written = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    assert written <= sum(len(b) for b in served_files(hub_root(hub)).values())
    assert snapshot(tmp_path, skip=target) == outside
    assert not (target / MANIFEST_NAME).exists()


def hub_root(hub: HubServer) -> Path:
    entry = next(e for e in hub.entries.values() if e.file is not None)
    return entry.file.parent


@pytest.mark.parametrize("change", ["same-size", "longer", "shorter"])
def test_repo_changing_between_listing_and_download_never_verifies(dsv4, hub, target, change):
    original = (hub_root(hub) / SHARD).read_bytes()
    new = {
        "same-size": bytes(b ^ 1 for b in original[:64]) + original[64:],
        "longer": original + b"more",
        "shorter": original[:-10],
    }[change]
    hub.faults.change_after_listing[SHARD] = new
    line = one_line_error(dsv4("pull", REPO, "--dir", str(target)))
    assert SHARD in line
    assert not (target / SHARD).exists() and not (target / MANIFEST_NAME).exists()
    assert not (target / PARTIAL_DIR / f"{SHARD}.part").exists() or change == "same-size"


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_linked_part_file_is_not_written_through(dsv4, hub, tmp_path, target, link):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    (target / PARTIAL_DIR).mkdir(parents=True)
    part = target / PARTIAL_DIR / f"{SHARD}.part"
    part.symlink_to(victim) if link == "symlink" else part.hardlink_to(victim)
    outside = snapshot(tmp_path, skip=target)
    line = one_line_error(dsv4("pull", REPO, "--dir", str(target)))
    assert f"{SHARD}.part" in line and link[:4] in line
    assert victim.read_bytes() == b"precious" and snapshot(tmp_path, skip=target) == outside


@pytest.mark.parametrize("planted", [PARTIAL_DIR, "sub"])
def test_symlinked_folder_in_the_target_is_not_followed(dsv4, hub, tmp_path, target, planted):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target.mkdir()
    (target / planted).symlink_to(elsewhere, target_is_directory=True)
    hub.add_file("sub/evil.json", EVIL, lfs=False)
    outside = snapshot(tmp_path, skip=target)
    line = one_line_error(dsv4("pull", REPO, "--dir", str(target)))
    assert planted in line and "symlink" in line
    assert list(elsewhere.iterdir()) == [] and snapshot(tmp_path, skip=target) == outside


def test_symlink_at_a_final_name_is_replaced_not_followed(dsv4, hub, tmp_path, target, tiny_checkpoint):
    victim = tmp_path / "victim.json"
    victim.write_bytes(b"precious")
    target.mkdir()
    (target / "config.json").symlink_to(victim)
    result = dsv4("pull", REPO, "--dir", str(target))
    assert result.code == 0, result.stderr
    assert victim.read_bytes() == b"precious"
    assert not (target / "config.json").is_symlink()
    assert_complete(target, tiny_checkpoint, hub)


@pytest.mark.slow
def test_two_pulls_into_one_folder_one_waits_both_verified(hub, tiny_checkpoint, target, python):
    total = sum(len(b) for b in served_files(tiny_checkpoint).values())
    hub.faults.bytes_per_second = total // 8  # the first run takes about 4 s on 2 workers
    command = [python, "-m", "dsv4cli", "pull", REPO, "--dir", str(target), "--workers", "2"]
    first = subprocess.Popen(command, env=os.environ, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (target / PARTIAL_DIR).is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = subprocess.Popen(command, env=os.environ, stderr=subprocess.PIPE, text=True)
    _, first_err = first.communicate(timeout=120)
    _, second_err = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (first_err, second_err)
    assert f"pid {first.pid}" in second_err and "waiting" in second_err
    assert_complete(target, tiny_checkpoint, hub)
    for path in served_files(tiny_checkpoint):  # the second run found every file verified
        assert len(hub.requests_for(path)) == 1, path


@pytest.mark.slow
def test_dry_run_writes_nothing(dsv4, hub, tmp_path, target, isolated_env):
    before = snapshot(tmp_path)
    for args in (
        ("pull", REPO, "--dir", str(target), "--dry-run"),
        ("pull", "tiny", "--dry-run"),
        ("pull", "tiny", "--dir", str(target), "--dry-run"),
    ):
        result = dsv4(*args)
        assert result.code == 0, result.stderr
        assert snapshot(tmp_path) == before, args
    assert file_requests(hub) == 0


def test_dry_run_of_an_existing_pull_changes_nothing(dsv4, hub, tmp_path, target):
    assert dsv4("pull", REPO, "--dir", str(target)).code == 0
    (target / PARTIAL_DIR).mkdir()
    (target / PARTIAL_DIR / "stale.part").write_bytes(b"x")
    before = snapshot(tmp_path)
    assert dsv4("pull", REPO, "--dir", str(target), "--dry-run").code == 0
    assert snapshot(tmp_path) == before


@pytest.fixture
def readonly_dir(tmp_path: Path):
    """A tmpfs remounted read-only (root ignores permission bits, so chmod cannot make a folder read-only)."""
    with tmpfs(tmp_path / "ro", 4 << 20) as mount:
        (mount / "existing").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield mount


@pytest.mark.parametrize("where", ["existing", "new/deeper"])
def test_read_only_folder_is_one_true_line(dsv4, hub, readonly_dir, where):
    folder = readonly_dir / where
    line = one_line_error(dsv4("pull", REPO, "--dir", str(folder)))
    assert "read-only file system" in line and str(readonly_dir) in line, line
    assert "not enough free disk" not in line


@pytest.mark.parametrize("where", ["file", "long"])
def test_unusable_dir_is_one_line(dsv4, hub, tmp_path, where):
    (tmp_path / "a-file").write_text("x")
    folder = tmp_path / "a-file" / "out" if where == "file" else tmp_path / ("x" * 300)
    line = one_line_error(dsv4("pull", REPO, "--dir", str(folder)))
    assert str(tmp_path) in line


def test_permission_denied_is_one_line(dsv4, hub, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root (the read-only mount test covers writes)")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = one_line_error(dsv4("pull", REPO, "--dir", str(locked / "out")))
    assert "permission denied" in line and str(locked) in line


@pytest.mark.slow
def test_disk_filling_up_midway_is_one_true_line(hub, tmp_path, python, tiny_checkpoint):
    """The free-space check passes, then something else fills the disk while the download runs."""
    shard = (tiny_checkpoint / SHARD).read_bytes()
    with tmpfs(tmp_path / "small", len(shard) + (512 << 10)) as disk:
        hub.faults.bytes_per_second = 1 << 20
        folder = disk / "out"
        command = [python, "-m", "dsv4cli", "pull", REPO, "--dir", str(folder), "--include", SHARD]
        child = subprocess.Popen(command, env=os.environ, stderr=subprocess.PIPE, text=True)
        part = folder / PARTIAL_DIR / f"{SHARD}.part"
        deadline = time.monotonic() + 30
        while not (part.is_file() and part.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 1 and "Traceback" not in stderr, stderr
        line = stderr.strip().splitlines()[-1]
        assert line.startswith("error: disk full writing") and SHARD in line and "partial downloads are kept" in line
        (disk / "filler").unlink()
        hub.faults.bytes_per_second = None
        done = subprocess.run(command, env=os.environ, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (folder / SHARD).read_bytes() == shard


def test_os_write_errors_are_one_line_naming_the_file():
    import errno

    from dsv4cli.cli import format_error

    for code, words in (
        (errno.ENOSPC, "no space left"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
    ):
        message = format_error(OSError(code, os.strerror(code), "/data/out/x.gguf"))
        assert message is not None and words in message and "/data/out/x.gguf" in message
        assert "kept" not in message and "\n" not in message
    message = format_error(PermissionError(errno.EACCES, "denied", "bad\nname"))
    assert message is not None and "\n" not in message
    assert format_error(OSError(errno.EIO, "I/O error")) is None  # not a user error: keeps its traceback


@pytest.mark.parametrize("garbage", [b"\xff\xfe" * 100, b"[1, 2]", b'{"files": {"../x": 5}}', b"{" * 100_000])
def test_garbage_manifest_is_ignored(dsv4, hub, target, tiny_checkpoint, garbage):
    target.mkdir()
    (target / MANIFEST_NAME).write_bytes(garbage)
    result = dsv4("pull", REPO, "--dir", str(target))
    assert result.code == 0, result.stderr
    assert_complete(target, tiny_checkpoint, hub)


def test_planted_fifo_is_refused_without_hanging(dsv4, hub, target):
    (target / PARTIAL_DIR).mkdir(parents=True)
    os.mkfifo(target / PARTIAL_DIR / "verified.jsonl")
    line = one_line_error(dsv4("pull", REPO, "--dir", str(target)))
    assert "verified.jsonl" in line and "not a regular file" in line, line


def test_garbage_manifest_offline_is_one_line(dsv4, target, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target.mkdir()
    (target / MANIFEST_NAME).write_text(json.dumps({"repo": REPO, "revision": "x", "files": {"../../x": {"size": 1}}}))
    line = one_line_error(dsv4("pull", REPO, "--dir", str(target)))
    assert "no complete pull there" in line  # a manifest naming an unsafe path is no manifest (read_manifest)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'"a string"',
        b"[]",
        b'{"id": "x", "sha": "abc", "siblings": 5}',
        b'{"id": "x", "sha": "abc", "siblings": [{"size": 1}]}',
        b'{"id": "x", "sha": "abc", "siblings": [{"rfilename": "../x", "size": 1, "blobId": null}]}',
        b'{"id": "x", "sha": 12, "siblings": [{"rfilename": "a", "size": 1, "blobId": "' + b"0" * 40 + b'"}]}',
        b'{"id": "x", "sha": "a\\nb", "siblings": []}',
    ],
)
def test_malformed_listing_json_is_one_line(dsv4, hub, tmp_path, target, body):
    hub.faults.listing_body = body
    before = snapshot(tmp_path)
    one_line_error(dsv4("pull", REPO, "--dir", str(target)))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("location", ["self", "file:///etc/passwd", "ftp://127.0.0.1/x", "http://[::1"])
def test_hostile_redirects_are_one_line(dsv4, hub, tmp_path, target, location):
    hub.faults.redirect_to = f"{hub.url}/{REPO}/resolve/main/config.json" if location == "self" else location
    outside = snapshot(tmp_path, skip=target)
    line = one_line_error(dsv4("pull", REPO, "--dir", str(target), "--include", "config.json"))
    assert "config.json" in line
    assert snapshot(tmp_path, skip=target) == outside and not (target / "config.json").exists()


def test_ordinary_repo_names_are_accepted():
    from dsv4cli.hub.safe_paths import listing_problem

    names = [
        ".gitattributes",
        "README.md",
        "LICENSE",
        "config.json",
        "inference/model.py",
        "inference/kernel/fp8 gemm.py",
        "figures/résumé-日本語.png",
        "model-00001-of-00046.safetensors",
        "a.b/c-d_e+f@g~h,i=j.txt",
        "/".join(["d"] * 31) + "/f",
    ]
    assert listing_problem(names, reserved_prefix=".dsv4-") is None


@pytest.mark.slow
def test_builtin_pull_ignores_links_planted_in_its_staging(dsv4, tmp_path, tiny_checkpoint):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    target = tmp_path / "tiny"
    (target / PARTIAL_DIR / "builtin-stale").mkdir(parents=True)
    (target / PARTIAL_DIR / "builtin-stale" / "link").symlink_to(victim, target_is_directory=True)
    (target / PARTIAL_DIR / "builtin-link").symlink_to(victim, target_is_directory=True)
    (target / "config.json").symlink_to(victim / "keep.txt")
    outside = snapshot(tmp_path, skip=target)
    result = dsv4("pull", "tiny", "--dir", str(target))
    assert result.code == 0, result.stderr
    assert snapshot(tmp_path, skip=target) == outside
    assert (target / "config.json").read_bytes() == (tiny_checkpoint / "config.json").read_bytes()
