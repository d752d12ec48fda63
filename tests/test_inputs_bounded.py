"""One test per class of hostile input to `plan` and `chat`: GGUF headers, plan files, flags, chat templates,
saved conversations and the REPL history, and the environment. The seeded fuzz (tests/test_input_fuzz.py) mixes
the same classes at random; these name each one and check the message.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import gguf
import pytest

from dsv4cli.chat.session import ChatSession, load_history
from dsv4cli.chat.template_sandbox import TemplateFailure, TemplateSandbox
from dsv4cli.engine.params import LoadParams, max_threads
from dsv4cli.errors import UsageError
from dsv4cli.plan.schema import load_plan_params
from quant.gguf_header import GgufHeaderError, parse_header, read_gguf_header
from tests.test_input_fuzz import ARR, STR, Lie, encode, parse_tiny


class BytesSource:
    """A byte-range source over memory, as a remote (HTTP range) reader would be."""

    def __init__(self, data: bytes, name: str = "remote.gguf", size: int | None = None) -> None:
        self.data, self.name, self.size = data, name, len(data) if size is None else size
        self.reads: list[tuple[int, int]] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


@pytest.fixture(scope="module")
def tiny(tiny_gguf: Path) -> dict:
    return parse_tiny(tiny_gguf)


def _file(tmp_path: Path, tiny: dict, **changes) -> Path:
    header = {**tiny, **changes}
    raw = encode(header)
    path = tmp_path / "x.gguf"
    with path.open("wb") as f:
        f.write(raw)
        f.truncate(len(raw) + tiny["data"])
    return path


def test_header_matches_gguf_py_and_reads_only_the_header(tiny_gguf: Path, tmp_path: Path) -> None:
    header = read_gguf_header(tiny_gguf)
    reader = gguf.GGUFReader(tiny_gguf)
    assert [(t.name, t.nbytes) for t in header.tensors] == [(t.name, int(t.n_bytes)) for t in reader.tensors]
    assert header.fields["tokenizer.ggml.tokens"] == reader.get_field("tokenizer.ggml.tokens").contents()
    data = tiny_gguf.read_bytes()
    remote = BytesSource(data[: header.data_offset], size=len(data))  # only the header bytes exist "remotely"
    assert parse_header(remote).tensors == header.tensors
    assert max(o + n for o, n in remote.reads) <= header.data_offset + (1 << 20)
    huge = tmp_path / "huge.gguf"  # a 64 GB file (sparse): still only its header is read
    huge.write_bytes(data[: header.data_offset])
    os.truncate(huge, 64 << 30)
    started = time.monotonic()
    assert read_gguf_header(huge).tensors == header.tensors and time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 1}, "version 1 is not supported"),
        ({"version": 0x03000000}, "big-endian"),
        ({"n_tensors": 2**62}, "tensor count"),
        ({"n_kv": 2**40}, "key count"),
        ({"kv": [("general.name", STR, Lie(2**60, "x"), None)]}, "more than the"),
        ({"kv": [("a", ARR, Lie(2**60, [1]), 4)]}, "elements in all"),
        ({"kv": [("a", ARR, [0] * (5 << 20), 0)]}, "elements in all"),
        ({"kv": [("a", ARR, [[1]], ARR)]}, "array element type 9"),
        ({"kv": [("a", 13, 0, None)]}, "unknown GGUF value type 13"),
        ({"kv": [("a", 4, 1, None), ("a", 4, 1, None)]}, "duplicate key"),
        ({"kv": [("", 4, 1, None)]}, "key 0 is empty"),
        ({"kv": [("general.alignment", 4, 3, None)]}, "not a power of 2"),
        ({"kv": [("general.alignment", 10, 64, None)]}, "must be a uint32"),
        ({"tensors": [("t", [32, 2, 1, 1, 1], 0, 0)]}, "5 dimensions"),
        ({"tensors": [("t", [-1], 0, 0)]}, "impossible shape"),
        ({"tensors": [("t", [2**62, 2**62], 0, 0)]}, "impossible shape"),
        ({"tensors": [("t", [32], 4, 0)]}, "ggml type 4"),
        ({"tensors": [("t", [32], 43, 0)]}, "ggml type 43"),
        ({"tensors": [("t", [33], 8, 0)]}, "not a multiple of the Q8_0 block"),
        ({"tensors": [("t", [32], 0, 0), ("t", [32], 0, 128)]}, "duplicate tensor name"),
        ({"tensors": [("t" * 64, [32], 0, 0)]}, "name of tensor 0 is 64 bytes"),
        ({"tensors": [("t", [32], 0, 0), ("u", [32], 0, 0)]}, r"expected 128 \(overlapping"),
        ({"tensors": [("t", [32], 0, 8)]}, "has data offset 8, expected 0"),
        ({"tensors": [("t", [1 << 40], 0, 0)]}, "past the end of the file"),
    ],
)
def test_damaged_headers_are_one_line_errors(tiny: dict, tmp_path: Path, change: dict, message: str) -> None:
    base = {"kv": [], "tensors": []}
    with pytest.raises(GgufHeaderError, match=message) as info:
        read_gguf_header(_file(tmp_path, {**tiny, **base}, **change))
    assert "\n" not in str(info.value) and "x.gguf" in str(info.value)


def test_truncated_flipped_and_special_files(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    for cut in (0, 3, 10, 23, 200, 5000):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GgufHeaderError, match=r"truncated|magic"):
            read_gguf_header(tmp_path / "cut.gguf")
    (tmp_path / "fifo.gguf").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "fifo.gguf")
    (tmp_path / "zero.gguf").symlink_to("/dev/zero")
    (tmp_path / "dir.gguf").mkdir()
    for name in ("fifo.gguf", "zero.gguf", "dir.gguf"):
        with pytest.raises(GgufHeaderError, match="not a regular file"):
            read_gguf_header(tmp_path / name)
    big = tmp_path / "big.gguf"  # a header larger than the cap (an array of long strings) is refused while read
    element = 15 << 20
    with big.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", ARR, STR, 8))
        for _ in range(8):
            f.write(struct.pack("<Q", element))
            f.seek(element, os.SEEK_CUR)
        f.truncate(f.tell() + 1024)
    with pytest.raises(GgufHeaderError, match="header larger than"):
        read_gguf_header(big)


def test_chat_and_plan_refuse_a_damaged_gguf_before_llama_cpp(dsv4, tiny: dict, tmp_path: Path) -> None:
    path = _file(tmp_path, tiny, n_tensors=2**40)
    for argv in (["plan", str(path)], ["chat", str(path), "-p", "hi"]):
        res = dsv4(*argv)
        assert res.code == 1 and res.stderr.count("\n") == 1 and "tensor count" in res.stderr


def test_plan_refuses_absurd_gguf_facts(dsv4, tiny: dict, tmp_path: Path) -> None:
    kvs = [kv if kv[0] != "deepseek4.expert_used_count" else (kv[0], 4, 2**32 - 1, None) for kv in tiny["kv"]]
    res = dsv4("plan", str(_file(tmp_path, tiny, kv=kvs)))
    assert res.code == 1 and "deepseek4.expert_used_count must be an integer in [1, 1024]" in res.stderr


# -- plan files ------------------------------------------------------------------------------------------------


def _plan(tmp_path: Path, **llama) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"schema": "dsv4.plan/1", "llama": {**LoadParams(n_threads=1).to_dict(), **llama}}))
    return path


@pytest.mark.parametrize(
    ("llama", "message"),
    [
        ({"n_ctx": 2**40}, r"llama\.n_ctx is 1099511627776; expected an integer in 1\.\.16777216"),
        ({"n_ctx": "4096"}, r"llama\.n_ctx is 4096; expected an integer"),
        ({"n_batch": 0}, r"llama\.n_batch is 0"),
        ({"n_ubatch": True}, r"llama\.n_ubatch is True"),
        ({"n_threads": 100000}, r"llama\.n_threads is 100000; expected an integer in 1\.\.512"),
        ({"n_gpu_layers": 2**40}, r"llama\.n_gpu_layers"),
        ({"tensor_split": [float("inf")]}, r"llama\.tensor_split"),
        ({"tensor_split": [1] * 17}, r"llama\.tensor_split"),
        ({"type_k": "q4", "type_v": "q4"}, r"llama\.type_k is q4"),
        ({"use_mmap": "yes"}, r"llama\.use_mmap is yes; expected true or false"),
        ({"override_tensor": [{"pattern": "(a|aa)*b", "buffer": "CPU"}]}, r"override_tensor\[0\]: regex"),
        ({"override_tensor": [{"pattern": "a*a*a*b", "buffer": "CPU"}]}, r"override_tensor\[0\]: regex"),
        ({"override_tensor": [{"pattern": "x" * 5000}]}, r"override_tensor\[0\]"),
        ({"override_tensor": [{"pattern": "x", "buffer": "CUDA0"}]}, r"override_tensor\[0\]"),
        ({"override_tensor": "x"}, r"llama\.override_tensor"),
    ],
)
def test_plan_file_values_are_checked(tmp_path: Path, llama: dict, message: str) -> None:
    path = _plan(tmp_path, **llama)
    with pytest.raises(UsageError, match=message) as info:
        load_plan_params(path)
    assert str(path) in str(info.value)


def test_plan_file_threads_beyond_this_machine_are_clamped_with_a_note(tmp_path: Path) -> None:
    notes: list[str] = []
    params = load_plan_params(_plan(tmp_path, n_threads=max_threads() + 1), note=notes.append)
    assert params.n_threads <= max_threads() and f"asks for {max_threads() + 1} threads" in notes[0]
    ok = load_plan_params(
        _plan(tmp_path, override_tensor=[{"pattern": r"^blk\.(1|10)\.ffn_.*_exps\.", "buffer": "CPU"}])
    )
    assert ok.host_tensors == (r"^blk\.(1|10)\.ffn_.*_exps\.",)


def test_plan_file_is_read_bounded(dsv4, tiny_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.json")
    with (tmp_path / "big.json").open("wb") as f:
        f.truncate(65 << 20)
    (tmp_path / "deep.json").write_text("[" * 100000)
    for name in ("zero.json", "fifo.json", "big.json", "deep.json", "missing.json"):
        res = dsv4("chat", str(tiny_gguf), "--plan", str(tmp_path / name), "-p", "hi")
        assert res.code == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        assert name in res.stderr


# -- flags -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threads", "100000"], f"logical CPUs; use 1..{max_threads()}"),
        (["--threads", "0"], "--threads 0"),
        (["--ram", "nan"], "--ram nan"),
        (["--ram", "inf"], "--ram inf"),
        (["--ram", "-1"], "--ram -1"),
        (["--vram", "0"], "--vram '0'"),
        (["--vram", "nan"], "--vram 'nan'"),
        (["--vram", ",".join(["8"] * 17)], "1..16 GiB budgets"),
        (["--ctx", "99999999999"], "--ctx 99999999999"),
        (["--ubatch", "0"], "--ubatch 0"),
        (["--margin", "nan"], "--margin nan"),
        (["--disk-bw", "inf"], "--disk-bw inf"),
    ],
)
def test_absurd_flags_are_refused_at_parse_time(dsv4, flags: list[str], message: str) -> None:
    res = dsv4("plan", "tiny", *flags)
    assert res.code == 1 and res.stderr.startswith("error: ") and message in res.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mem", "inf"], "--mem inf"),
        (["--mem", "nan"], "--mem nan"),
        (["--mem", "-3"], "--mem -3"),
        (["--threads", "100000"], f"logical CPUs; use 1..{max_threads()}"),
    ],
)
def test_absurd_worker_flags_are_refused_at_parse_time(dsv4, flags: list[str], message: str) -> None:
    res = dsv4("worker", "--port", "0", *flags)
    assert res.code == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert message in res.stderr


# -- chat templates ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", "took longer than 2 s"),
        ("{{ 'x' * 10**10 }}", "more than 1024 MiB of memory"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses too deeply"),
        ("{% for a in range(99999) %}{{ 'y' * 1000 }}{% endfor %}", "output is longer than"),
        ("{{ ''.__class__.__mro__ }}", "SecurityError"),
        ("{% for %}", "compile failed: TemplateSyntaxError"),
    ],
)
def test_hostile_templates_are_stopped(template: str, message: str) -> None:
    sandbox = TemplateSandbox(template, seconds=2)
    started = time.monotonic()
    with pytest.raises(TemplateFailure, match=message):
        sandbox.render(messages=[])
    assert time.monotonic() - started < 8
    sandbox.close()


def test_a_failed_render_does_not_break_the_next() -> None:
    sandbox = TemplateSandbox("{{ messages[0] / 0 if messages else 'ok' }}")
    with pytest.raises(TemplateFailure, match="ZeroDivisionError"):
        sandbox.render(messages=[1])
    assert sandbox.render(messages=[]) == "ok"
    sandbox.close()


# -- saved conversations, REPL history, environment ------------------------------------------------------------


class _Engine:
    def reset(self) -> None: ...


def test_save_and_load_fail_in_one_line_and_keep_good_state(tmp_path: Path) -> None:
    session = ChatSession(_Engine(), renderer=None, history=[{"role": "user", "content": "\udcff kept"}])  # type: ignore[arg-type]
    good = tmp_path / "conv.json"
    session.save(good)
    before = good.read_bytes()
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(UsageError, match="cannot save conversation to"):
            session.save(readonly / "x.json")
    finally:
        readonly.chmod(0o700)
    for content in ("[1]", '{"messages": [{"role": "tool", "content": "x"}]}', '{"messages": [], "system": 5}', "{"):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(UsageError, match="cannot load conversation from"):
            session.load(tmp_path / "bad.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    with pytest.raises(UsageError, match="not a regular file"):
        session.load(tmp_path / "zero.json")
    assert session.history == [{"role": "user", "content": "\udcff kept"}] and good.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_history_file_that_is_a_fifo_is_skipped(tmp_path: Path) -> None:
    import readline

    os.mkfifo(tmp_path / "history")
    started = time.monotonic()
    load_history(readline, tmp_path / "history")  # would block forever if read
    assert time.monotonic() - started < 2


def test_dsv4_home_that_is_a_file(dsv4, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("DSV4_HOME", str(tmp_path / "file"))
    res = dsv4("doctor")
    assert res.code == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


@pytest.mark.slow
def test_stdin_prompt_is_bounded_and_any_bytes_are_text(tiny_gguf: Path, python: str) -> None:
    import subprocess

    def chat(data: bytes, *argv: str) -> subprocess.CompletedProcess[bytes]:
        cmd = [python, "-m", "dsv4cli", "chat", str(tiny_gguf), "--max-tokens", "1", *argv]
        return subprocess.run(cmd, input=data, capture_output=True, timeout=120)

    res = chat(b"\xff\xfe not UTF-8 \xc3")
    assert res.returncode == 0, res.stderr
    res = chat(b"x" * ((8 << 20) + 1))
    assert res.returncode == 1 and res.stderr.decode().startswith("error: the prompt on stdin is longer than")
    res = chat(b"", "-p", "\udcff\udcfe hi")  # undecodable argv bytes arrive as lone surrogates
    assert res.returncode == 0 and b"Traceback" not in res.stderr
