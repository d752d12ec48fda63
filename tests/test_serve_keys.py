"""`dsv4 serve`'s API key: an empty or blank key from the flag, the DSV4_API_KEY environment variable or a key file
is refused in one line (never served as "no key"), and a key from the environment really guards the server."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.test_serve_cli import _start


def _one_line(result, words: str) -> None:
    assert result.code == 1 and words in result.stderr and result.stderr.count("\n") == 1, result


@pytest.mark.parametrize("key", ["", " ", "\t \n"])
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_blank_key_on_the_command_line_is_refused(dsv4, key: str, host: str) -> None:
    _one_line(dsv4("serve", "tiny", "--host", host, "--api-key", key), "empty or only whitespace")


@pytest.mark.parametrize("key", ["", "   "])
def test_a_blank_key_in_the_environment_is_refused(dsv4, monkeypatch, key: str) -> None:
    monkeypatch.setenv("DSV4_API_KEY", key)
    _one_line(dsv4("serve", "tiny", "--host", "0.0.0.0"), "DSV4_API_KEY is empty or only whitespace")


def test_the_environment_key_counts_as_a_key(dsv4, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DSV4_API_KEY", "k")
    keys = tmp_path / "keys"
    keys.write_text("k2\n")
    _one_line(dsv4("serve", "tiny", "--api-key-file", str(keys)), "not both")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "holds no key"),
        (b"\n", "line 1 is empty"),
        (b"  \t\n", "line 1 is empty"),
        (b"good\n\nother\n", "line 2 is empty"),
        (b"\xff\xfe", "not a key file"),
        (b"k" * (65 << 10), "not a key file"),
    ],
)
def test_a_key_file_without_real_keys_is_refused(dsv4, tmp_path: Path, content: bytes, words: str) -> None:
    keys = tmp_path / "keys"
    keys.write_bytes(content)
    _one_line(dsv4("serve", "tiny", "--host", "0.0.0.0", "--api-key-file", str(keys)), words)


def _status(base_url: str, key: str | None) -> int:
    request = urllib.request.Request(f"{base_url}/v1/models")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            json.loads(r.read())
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_key_from_the_environment_guards_the_server(
    engine, python: str, tiny_gguf: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("DSV4_API_KEY", "env-key-1")
    proc, info = _start(python, tiny_gguf, tmp_path / "home")
    try:
        assert _status(info["base_url"], None) == 401
        assert _status(info["base_url"], "") == 401
        assert _status(info["base_url"], "wrong") == 401
        assert _status(info["base_url"], "env-key-1") == 200
        assert "env-key-1" not in " ".join(Path(f"/proc/{info['pid']}/cmdline").read_text().split("\0"))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
