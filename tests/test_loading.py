"""The loading layer (`dsv4cli.load`): one path from MODEL to an engine for chat, serve and eval, each header read
once; `org/name/file.gguf` in every command; the llama-server engine behind the chat REPL; scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dsv4cli.load.placement import Placement
from dsv4cli.load.prepared import prepare_model
from dsv4cli.models.ref import RefKind, resolve_model
from tests.conftest import GGUF_REPO as REPO
from tests.conftest import GGUF_TAG as TAG

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed: it records only inside `opens()`


@contextmanager
def opens(path: Path) -> Iterator[list[str]]:
    """Every time this process opens `path` (Python's `open` audit event: the header reader's reads)."""
    global _opened
    _opened, seen = [], []
    try:
        yield seen
    finally:
        seen += [p for p in _opened if Path(p).resolve() == path.resolve()]
        _opened = None


def test_a_load_reads_the_header_once(tiny_gguf: Path, tmp_path: Path, dsv4) -> None:
    """Resolution, the header check, the plan (or the plan file's model check) and the prompt renderer of one load
    share one read of the header."""
    with opens(tiny_gguf) as seen:
        prepared = prepare_model(resolve_model(str(tiny_gguf)), Placement(ctx=1024), note=lambda _: None)
        assert prepared.renderer.render([{"role": "user", "content": "Hi"}], thinking=False).text
        assert prepared.llama_args[:2] == ["-m", str(tiny_gguf)]
    assert len(seen) == 1

    plan = tmp_path / "plan.json"
    assert dsv4("plan", str(tiny_gguf), "--ram", "4", "--ctx", "1024", "-o", str(plan)).code == 0
    with opens(tiny_gguf) as seen:
        prepare_model(tiny_gguf, Placement(plan_file=plan), note=lambda _: None)
    assert len(seen) == 1


def test_ref_kinds_are_typed_and_keep_their_strings(tiny_gguf: Path) -> None:
    ref = resolve_model(str(tiny_gguf))
    assert ref.kind is RefKind.GGUF and ref.kind == "gguf" and json.dumps(ref.kind) == '"gguf"'
    hub_file = resolve_model(f"{REPO}/{TAG}/tiny-{TAG}-00001-of-00004.gguf")
    assert hub_file.kind is RefKind.HUB and hub_file.spec.repo == REPO
    assert hub_file.file == f"{TAG}/tiny-{TAG}-00001-of-00004.gguf"


def test_org_name_file_gguf_works_in_every_command(dsv4, gguf_hub, gguf_repo_dir: Path, isolated_env: Path) -> None:
    single = f"{REPO}/tiny-Q8_0.gguf"
    args = ("--vram", "0.01", "--ram", "64", "--ctx", "4096", "--json")
    folder = isolated_env / "models" / "test-org--tiny-GGUF"

    remote = dsv4("plan", single, *args)  # before the download: its header over HTTP
    assert remote.code == 0, remote.stderr
    assert json.loads(remote.stdout)["source"]["kind"] == "remote"
    shown = dsv4("show", single, "--json")
    assert shown.code == 0 and json.loads(shown.stdout)["kind"] == "remote"

    missing = dsv4("pull", f"{REPO}/nope.gguf")
    assert missing.code == 1 and "no GGUF model file 'nope.gguf'" in missing.stderr
    pulled = dsv4("pull", single, "--json")
    assert pulled.code == 0, pulled.stderr
    assert [f["path"] for f in json.loads(pulled.stdout)["files"]] == ["tiny-Q8_0.gguf"]  # that file only
    assert (folder / "tiny-Q8_0.gguf").read_bytes() == (gguf_repo_dir / "tiny-Q8_0.gguf").read_bytes()
    first = sorted(p.relative_to(gguf_repo_dir).as_posix() for p in (gguf_repo_dir / TAG).glob("*.gguf"))
    split = dsv4("pull", f"{REPO}/{first[0]}", "--json")  # the first shard names its whole set
    assert split.code == 0 and sorted(f["path"] for f in json.loads(split.stdout)["files"]) == first

    local = dsv4("plan", single, *args)
    assert local.code == 0 and json.loads(local.stdout)["source"]["files"] == [str(folder / "tiny-Q8_0.gguf")]
    assert json.loads(dsv4("show", single, "--json").stdout)["kind"] == "gguf"
    served = prepare_model(resolve_model(single), Placement(cpu=True), note=print)  # serve's loading path
    assert served.gguf == folder / "tiny-Q8_0.gguf"
    chat = [sys.executable, "-m", "dsv4cli", "chat", single, "-p", "Hi", "--max-tokens", "4", "--temp", "0"]
    run = subprocess.run(chat, capture_output=True, text=True, timeout=120, env=os.environ)
    assert run.returncode == 0 and "prompt tokens" in run.stderr, run.stderr

    assert dsv4("rm", single, "--yes").code == 0
    assert not (folder / "tiny-Q8_0.gguf").exists() and (folder / first[0]).is_file()  # the other quant stays
    gone = dsv4("chat", single, "-p", "Hi")
    assert gone.code == 1 and f"run `dsv4 pull {single}`" in gone.stderr


def test_serve_does_not_import_the_repl() -> None:
    code = "import sys, dsv4cli.server.launch, dsv4cli.cli.serve; print('dsv4cli.chat.session' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_scoring_runs_the_engine_builds_perplexity_with_the_load_parameters(engine, tiny_gguf: Path) -> None:
    from dsv4cli.engine.scoring import TOOL, scoring_argv

    binary = engine.tool(TOOL)
    prepared = prepare_model(tiny_gguf, Placement(ctx=1024, cpu=True), note=lambda _: None)
    argv = scoring_argv(prepared, ctx=256, extra=["-f", "text.txt"], engine_bin=binary.with_name("llama-server"))
    assert Path(argv[0]) == binary and binary.is_file() and argv[-2:] == ["-f", "text.txt"]
    expected = prepared.llama_args  # the load flags chat and serve use, with the chunk length and batch cut to it
    for flag, value in (("-c", "256"), ("-b", "256"), ("-ub", "256")):
        expected[expected.index(flag) + 1] = value
    assert argv[1:-2] == expected and str(tiny_gguf) in argv


def test_chat_runs_on_llama_server_through_the_same_repl(engine, tiny_gguf: Path, isolated_env: Path) -> None:
    """`dsv4 chat --engine server`: the same session and prompts on a llama-server child; greedy answers equal the
    in-process engine's (one llama.cpp), and a follow-up turn reuses the server's prompt cache."""
    from dsv4cli.chat.session import ChatSession
    from dsv4cli.engine import SampleOptions
    from dsv4cli.load.engines import open_engine

    prepared = prepare_model(tiny_gguf, Placement(ctx=1024, cpu=True), note=lambda _: None)
    options = SampleOptions(max_tokens=8, temp=0.0, seed=1)
    answers = {}
    for name in ("inprocess", "server"):
        runner = open_engine(name, prepared, engine_bin=engine.server, note=lambda _: None)
        try:
            session = ChatSession(runner, prepared.renderer, options=options)
            first = "".join(text for _, text in session.send("Hello there"))
            assert session.last.stats.generated_tokens > 0 and session.last.stats.stopped in ("eos", "length")
            list(session.send("And again"))
            answers[name] = (first.rstrip("\ufffd"), session.last.stats.reused_tokens)
        finally:
            runner.close()
    # equal up to how each shows a UTF-8 sequence cut by --max-tokens (random weights emit byte tokens)
    assert answers["server"][0] == answers["inprocess"][0]
    assert answers["server"][1] > 0  # the second turn prefilled only its new tokens
    assert not list((isolated_env / "run").glob("serve-*.json"))  # the server and its record are gone
