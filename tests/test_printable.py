"""Text from strangers reaches the terminal printable: file names (`list`, `show`), `--rpc` hosts (`plan`), error
text, and the model's output in the chat REPL; the REPL survives EOF inside a paste and bounds what one turn holds.

The expectation: no ESC (0x1b), CSI (0x9b) or BEL byte in what dsv4 writes, and the escaped form in its place.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import shutil
import sys
import time
from pathlib import Path

import pytest

from quant.errors import printable

HOSTILE = "evil\x1b[2J\x1b]0;owned\x07\x9b31m\u202eend"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")


def _clean(text: str) -> bool:
    return not any(c in text for c in RAW)


def test_printable_escapes_controls_and_keeps_what_is_asked() -> None:
    assert printable(HOSTILE) == "evil\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\u202eend"
    assert printable("a\nb\tc", keep="\n\t") == "a\nb\tc" and printable("a\nb") == "a\\nb"
    assert printable("plain ünïcode 中文 [b]") == "plain ünïcode 中文 [b]"
    assert printable(b"bad\xff") == "bad\\udcff"
    assert printable("x" * 50, limit=10) == "xxxxxxx..."


def test_list_and_rm_show_a_hostile_file_name_escaped(dsv4, tiny_gguf: Path, isolated_env: Path) -> None:
    gguf = isolated_env / "gguf"
    gguf.mkdir(parents=True)
    name = f"{HOSTILE}.gguf"
    shutil.copy(tiny_gguf, gguf / name)
    listed = dsv4("list")
    assert listed.code == 0 and _clean(listed.stdout + listed.stderr) and "evil\\x1b[2J" in listed.stdout
    removed = dsv4("rm", name, "--yes")
    assert removed.code == 0 and _clean(removed.stderr) and "evil\\x1b[2J" in removed.stderr


def test_show_of_a_hostile_file_name_is_escaped(dsv4, tiny_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / f"{HOSTILE}.gguf"
    shutil.copy(tiny_gguf, path)
    shown = dsv4("show", str(path))
    assert shown.code == 0 and _clean(shown.stdout + shown.stderr) and "evil\\x1b[2J" in shown.stdout
    missing = dsv4("show", str(tmp_path / f"gone{HOSTILE}.gguf"))
    assert missing.code == 1 and _clean(missing.stderr) and "gone" in missing.stderr


def test_a_hostile_rpc_host_is_escaped_in_plan(dsv4) -> None:
    result = dsv4("plan", "tiny", "--rpc", f"{HOSTILE}:50052")
    assert result.code != 0 and _clean(result.stdout + result.stderr) and "evil\\x1b" in result.stderr
    assert "a host may hold only letters" in result.stderr and result.stderr.count("\n") == 1


def test_model_output_in_the_repl_is_escaped(capsys) -> None:
    from dsv4cli.cli.chat import TerminalUI

    ui = TerminalUI.__new__(TerminalUI)  # only its output methods: no readline, no history file
    ui.piece("answer", f"{HOSTILE}\nnext line\t!")
    ui.note(f"error: {HOSTILE}")
    out, err = capsys.readouterr()
    assert _clean(out + err) and "next line" in out and "evil\\x1b[2J" in out and "evil\\x1b[2J" in err


def _reader(lines: list[str]):
    def read(_prompt: str) -> str:
        if not lines:
            raise EOFError
        return lines.pop(0)

    return read


def test_eof_inside_a_paste_ends_the_input() -> None:
    from dsv4cli.chat.session import PASTE_START, read_turn

    with pytest.raises(EOFError):
        read_turn(_reader([f"{PASTE_START}hello", "world"]))


def test_a_huge_paste_is_read_to_its_end_and_refused_in_one_line() -> None:
    from dsv4cli.chat.session import MAX_TURN_CHARS, PASTE_END, PASTE_START, read_turn
    from dsv4cli.errors import UsageError

    lines = [f"{PASTE_START}start", *["y" * 100_000] * (MAX_TURN_CHARS // 100_000 + 1), f"tail{PASTE_END}", "next"]
    reader = _reader(lines)
    with pytest.raises(UsageError, match="more than the"):
        read_turn(reader)
    assert read_turn(reader) == "next"  # the rest of the paste did not become turns of its own
    with pytest.raises(UsageError):
        read_turn(_reader(["z" * (MAX_TURN_CHARS + 1)]))


def test_the_repl_leaves_on_eof_inside_a_paste(tiny_gguf: Path, isolated_env: Path) -> None:
    """A real terminal: a paste start marker, text, Ctrl-D inside the paste, then Ctrl-D on an empty line."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: dsv4 chat on the pty
        os.execv(sys.executable, [sys.executable, "-m", "dsv4cli", "chat", str(tiny_gguf), "--max-tokens", "2"])
    try:
        seen = b""
        deadline = time.monotonic() + 120
        while b"> " not in seen.partition(b"loaded")[2] and time.monotonic() < deadline:
            if select.select([fd], [], [], 1)[0]:
                seen += os.read(fd, 1 << 16)
        time.sleep(1)  # readline has printed the prompt; let it take the terminal before the keys come
        os.write(fd, b"\x1b[200~hello\x04\n\x04")
        exited = False
        deadline = time.monotonic() + 60
        while not exited and time.monotonic() < deadline:
            exited = os.waitpid(pid, os.WNOHANG)[0] == pid
            if not exited and select.select([fd], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):
                    os.read(fd, 1 << 16)
        assert exited, "dsv4 chat still waits after EOF inside a paste"
    finally:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            if not os.waitpid(pid, os.WNOHANG)[0]:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        os.close(fd)
