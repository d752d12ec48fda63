"""No input kills an engine: a prompt of 30,000 letters without a space (which overflows the 8 MB stack in
llama.cpp's regex pre-tokenizer) through `dsv4 chat` and through `dsv4 serve`'s /v1/chat/completions, and a
llama-server that dies anyway is restarted by serve.

The expectations are the engines' own answers: the token count llama.cpp reports, an HTTP answer from the
same server process, and a server answering again after it was killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.test_serve_cli import _start

LETTERS = "a" * 30_000


def _chat(python: str, gguf: Path, prompt: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "dsv4cli", "chat", str(gguf), "--max-tokens", "4", "--temp", "0"],
        input=prompt,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ,
    )


def test_chat_tokenizes_30000_letters_without_a_space(python: str, tiny_gguf: Path) -> None:
    result = _chat(python, tiny_gguf, LETTERS)
    assert result.returncode == 1, result.stderr  # not -11 (SIGSEGV): the tokenizer counted the tokens
    counted = re.search(r"the conversation has (\d+) tokens, the context holds 4096", result.stderr)
    assert counted and int(counted[1]) > 30_000, result.stderr  # every letter a token, plus the template's
    assert result.stderr.count("\n") == 1


def test_chat_refuses_a_run_too_long_for_any_stack(python: str, tiny_gguf: Path) -> None:
    from dsv4cli.engine.stack import MAX_RUN_CHARS

    result = _chat(python, tiny_gguf, "b" * (MAX_RUN_CHARS + 1))
    assert result.returncode == 1 and "without a space" in result.stderr and result.stderr.count("\n") == 1


def test_in_process_tokenizer_counts_a_long_run(tiny_gguf: Path) -> None:
    from dsv4cli.engine import LoadParams
    from dsv4cli.engine.inprocess import LlamaEngine

    engine = LlamaEngine(tiny_gguf, LoadParams(n_ctx=512))
    try:
        assert len(engine.tokenize("x" * 200_000)) == 200_000  # one token per letter in the tiny vocabulary
    finally:
        engine.close()


def _post(base_url: str, text: str) -> int:
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 2}).encode()
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _healthy(base_url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def test_serve_survives_the_prompt_and_restarts_a_dead_server(
    engine, python: str, tiny_gguf: Path, tmp_path: Path
) -> None:
    proc, info = _start(python, tiny_gguf, tmp_path / "home")
    try:
        status = _post(info["base_url"], LETTERS)
        assert status == 400  # longer than the context, answered by the same server
        assert psutil.Process(info["pid"]).is_running()
        assert _post(info["base_url"], "hello") == 200

        os.kill(info["pid"], signal.SIGSEGV)  # dies anyway: serve starts it again on the same port
        line = proc.stderr.readline()
        while "restarting" not in line and line:
            line = proc.stderr.readline()
        assert "llama-server was killed by SIGSEGV; restarting it" in line
        assert _healthy(info["base_url"], 120) and _post(info["base_url"], "hello") == 200
        assert proc.poll() is None
        assert "dsv4 serve: llama-server was killed by SIGSEGV" in Path(info["log"]).read_text(errors="replace")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


@pytest.mark.parametrize(("code", "words"), [(-11, "was killed by SIGSEGV"), (3, "exited with code 3")])
def test_exit_reasons_are_named(code: int, words: str) -> None:
    from dsv4cli.server.supervise import exit_reason

    assert exit_reason(code) == words
