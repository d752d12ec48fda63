"""`dsv4 serve` as users run it: refusals before anything starts, and no server left behind when it stops."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dsv4cli.models.ref import resolve_model


def test_non_loopback_host_needs_a_key(dsv4) -> None:
    result = dsv4("serve", "tiny", "--host", "0.0.0.0")
    assert result.code == 1
    assert "refusing to serve without an API key" in result.stderr and "--api-key" in result.stderr


def test_key_file_must_be_a_file(dsv4, tmp_path: Path) -> None:
    result = dsv4("serve", "tiny", "--host", "0.0.0.0", "--api-key-file", str(tmp_path))
    assert result.code == 1
    assert f"--api-key-file {tmp_path}: no such file (or not a regular file)" in result.stderr
    assert "one per line" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_parallel_is_bounded_by_llama_cpp_sequences(dsv4) -> None:
    result = dsv4("serve", "tiny", "--parallel", "257")  # LLAMA_MAX_SEQ is 256; more aborts llama-server
    assert result.code == 1 and result.stderr.strip() == "error: --parallel 257: expected 1..256"


def test_missing_model_is_one_line(dsv4, engine, tmp_path: Path) -> None:
    """No "starting llama-server" line before a refusal of the model."""
    result = dsv4("serve", str(tmp_path / "absent.gguf"))
    assert result.code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: GGUF file not found: {tmp_path / 'absent.gguf'} (give a .gguf path or a model name from `dsv4 models`)"
    ]


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_placement_flags_are_checked_alike(dsv4, command: str, tmp_path: Path, isolated_env: Path) -> None:
    """chat and serve share the placement flags and their refusals (cli/options.placement), before any work."""
    plan = tmp_path / "plan.json"
    result = dsv4(command, "tiny", "--plan", str(plan), "--ctx", "1024")
    assert result.code == 1 and "--plan already fixes placement and context" in result.stderr
    result = dsv4(command, "tiny", "--cpu", "--vram", "24")
    assert result.code == 1 and "--cpu plans no GPU" in result.stderr
    assert not (isolated_env / "gguf").exists()  # refused before the built-in model was prepared


def test_loopback_hosts_need_no_key() -> None:
    from dsv4cli.server.process import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))


def test_port_in_use_is_a_clear_error(dsv4, engine, tiny_gguf: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = dsv4("serve", str(tiny_gguf), "--port", str(port))
    assert result.code == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr


def _start(python: str, gguf: Path, home: Path) -> tuple[subprocess.Popen, dict]:
    """`dsv4 serve --json` in its own process (the `engine` fixture has built the engine); returns it and its
    first stdout line (base_url, pid)."""
    proc = subprocess.Popen(
        [python, "-m", "dsv4cli", "serve", str(gguf), "--port", "0", "--ctx", "1024", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DSV4_HOME": str(home)},
    )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    if not ready:
        proc.kill()
        pytest.fail("dsv4 serve did not report its server within 120 s")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"dsv4 serve exited: {proc.stderr.read()}")
    return proc, json.loads(line)


def _gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopping_dsv4_leaves_no_server(
    engine, python: str, tiny_gguf: Path, tmp_path: Path, sig: signal.Signals, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsv4cli.server.records import running_servers

    proc, info = _start(python, tiny_gguf, tmp_path / "home")
    server = psutil.Process(info["pid"])
    assert server.is_running() and "llama-server" in server.name()
    assert info["base_url"].startswith("http://127.0.0.1:") and info["model"] == str(tiny_gguf)
    monkeypatch.setenv("DSV4_HOME", str(tmp_path / "home"))
    (record,) = running_servers()  # what `dsv4 rm` checks before deleting a model
    assert record["pid"] == proc.pid and record["files"] == [str(tiny_gguf.resolve())]
    assert record["url"] == info["base_url"] + "/v1" and record["model"] == str(tiny_gguf)
    proc.send_signal(sig)  # SIGKILL: dsv4 cannot clean up; the kernel's parent-death signal stops the server
    proc.wait(30)
    assert _gone(info["pid"]), f"llama-server {info['pid']} outlived dsv4 ({sig.name})"
    assert running_servers() == []  # removed on a clean stop; after SIGKILL left behind but stale (pid dead)
    assert len(list((tmp_path / "home" / "run").glob("serve-*.json"))) == (sig == signal.SIGKILL)
    if sig != signal.SIGKILL:
        assert proc.returncode in (0, 143)


def test_server_that_fails_to_start_reports_its_log(dsv4, tiny_gguf: Path, tmp_path: Path) -> None:
    fake = tmp_path / "llama-server"  # answers --version like llama-server, then fails as a bad load would
    fake.write_text(
        '#!/bin/sh\n[ "$1" = "--version" ] && { echo "version: 1 (fake)"; exit 0; }\n'
        'echo "llama_model_load: error loading model"; exit 3\n'
    )
    fake.chmod(0o755)
    result = dsv4("serve", str(tiny_gguf), "--port", "0", "--engine-bin", str(fake))
    assert result.code == 1
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert "exited with code 3" in line and "error loading model" in line and "llama-server-" in line


def test_server_command_line_applies_the_plan(tiny_gguf: Path) -> None:
    from dsv4cli.load.placement import Placement
    from dsv4cli.load.prepared import prepare_model
    from dsv4cli.server.launch import ServeOptions, server_argv
    from dsv4cli.toolchain.build import ServerBinary

    planned = prepare_model(resolve_model(str(tiny_gguf)), Placement(ctx=1024), note=lambda _: None)
    engine = ServerBinary(server=Path("/opt/llama-server"), version="test", gpu="cpu")
    argv = server_argv(engine, planned, ServeOptions(api_key="s3cret", think=True), alias="tiny", port=9)
    assert argv[0] == "/opt/llama-server" and argv[1:3] == ["-m", str(tiny_gguf)]
    assert argv[argv.index("-c") + 1] == "1024"  # the plan's own flags, in this llama-server's spelling
    assert argv[argv.index("--load-mode") + 1] == "none" and "--no-mmap" not in argv
    pairs = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert pairs["--reasoning-format"] == "deepseek" and pairs["--reasoning"] == "on" and pairs["--alias"] == "tiny"
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "9" and "--jinja" in argv
    assert "s3cret" not in " ".join(argv)  # the key travels in the environment, not where `ps` shows it
    assert "--spec-type" not in argv  # no nextn block in this file
