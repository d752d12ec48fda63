"""Chat logic without llama.cpp: prompt rendering, reasoning split, the REPL against a scripted engine, header checks.

The scripted engine stands in for llama.cpp only here (REPL logic); test_chat.py drives the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4cli.chat.prompt import PromptRenderer, ReasoningSplitter
from dsv4cli.chat.session import ChatSession, TurnResult, read_turn, run_repl
from dsv4cli.engine import SampleOptions, TurnStats, TurnStream
from dsv4cli.errors import RuntimeLoadError, UsageError
from dsv4cli.gguf_io.check import check_gguf
from dsv4cli.load.prepared import prompt_renderer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"


@pytest.fixture(scope="module")
def renderer(tiny_gguf: Path) -> PromptRenderer:
    return prompt_renderer(tiny_gguf)


# -- prompt -------------------------------------------------------------------------------------------


def test_non_thinking_prompt_matches_the_v4_format(renderer: PromptRenderer) -> None:
    """docs/formats.md §Chat format: system right after BOS, `</think>` opens every non-thinking answer."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again"},
    ]
    prompt = renderer.render(messages, thinking=False)
    assert prompt.text == (f"{BOS}Be brief.{USER}Hi{ASSISTANT}</think>Hello!{EOS}{USER}Again{ASSISTANT}</think>")
    assert prompt.fork_at is None


def test_thinking_prompt_drops_past_reasoning_and_marks_the_fork(renderer: PromptRenderer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
        {"role": "user", "content": "Again"},
    ]
    prompt = renderer.render(messages, thinking=True)
    assert prompt.text == f"{BOS}{USER}Hi{ASSISTANT}</think>Hello!{EOS}{USER}Again{ASSISTANT}<think>"
    assert "greet back" not in prompt.text
    # The next turn renders this answer as `</think>...`: the cache must be resumable just before `<think>`.
    assert prompt.text[: prompt.fork_at] == f"{BOS}{USER}Hi{ASSISTANT}</think>Hello!{EOS}{USER}Again{ASSISTANT}"


def test_missing_template_is_a_clear_error() -> None:
    with pytest.raises(RuntimeLoadError, match=r"no tokenizer\.chat_template"):
        PromptRenderer(None, bos_token=BOS, eos_token=EOS, source="x.gguf")


@pytest.mark.parametrize("split", [1, 2, 3, 5, 8])
def test_reasoning_splitter_handles_a_marker_cut_across_chunks(split: int) -> None:
    text = "let me think</think>The answer."
    chunks = [text[i : i + split] for i in range(0, len(text), split)]
    splitter = ReasoningSplitter(thinking=True)
    pieces = [p for c in chunks for p in splitter.feed(c)] + list(splitter.flush())
    assert "".join(t for k, t in pieces if k == "reasoning") == "let me think"
    assert "".join(t for k, t in pieces if k == "answer") == "The answer."


def test_reasoning_splitter_passes_answers_through_without_thinking() -> None:
    splitter = ReasoningSplitter(thinking=False)
    assert list(splitter.feed("a</think>b")) == [("answer", "a</think>b")]


# -- REPL against a scripted engine ------------------------------------------------------------------


class ScriptedEngine:
    """Yields queued replies chunk by chunk, then the turn's stats, and records the prompts it was given."""

    def __init__(self, *replies: list[str] | Exception) -> None:
        self.replies = list(replies)
        self.prompts: list[tuple[str, int | None]] = []
        self.resets = 0

    def stream(self, prompt: str, options: SampleOptions, *, fork_at: int | None = None) -> TurnStream:
        self.prompts.append((prompt, fork_at))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        yield from reply
        yield TurnStats(prompt_tokens=len(prompt))

    def reset(self) -> None:
        self.resets += 1

    def close(self) -> None:
        pass


class ScriptedUI:
    """Feeds input lines; "^C" in a line list raises KeyboardInterrupt at that point of the next answer."""

    def __init__(self, lines: list[str], *, interrupt_after: int | None = None) -> None:
        self.lines = lines
        self.interrupt_after = interrupt_after
        self.shown: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.turns: list[TurnResult] = []

    def read_line(self) -> str:
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)

    def piece(self, kind: str, text: str) -> None:
        self.shown.append((kind, text))
        if self.interrupt_after is not None and len(self.shown) >= self.interrupt_after:
            self.interrupt_after = None
            raise KeyboardInterrupt

    def end_answer(self, turn: TurnResult) -> None:
        self.turns.append(turn)

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_two_turns_then_reset_and_thinking(renderer: PromptRenderer, tmp_path: Path) -> None:
    engine = ScriptedEngine(["Hel", "lo"], ["Fine"], ["hmm</th", "ink>Yes"])
    session = ChatSession(engine, renderer, system="Sys")
    ui = ScriptedUI(["Hi", "How are you?", "/reset", "/think on", "Sure?", f"/save {tmp_path / 'c.json'}"])
    run_repl(session, ui)

    assert engine.prompts[0] == (f"{BOS}Sys{USER}Hi{ASSISTANT}</think>", None)
    assert engine.prompts[1][0] == f"{BOS}Sys{USER}Hi{ASSISTANT}</think>Hello{EOS}{USER}How are you?{ASSISTANT}</think>"
    assert engine.resets == 1
    third, fork = engine.prompts[2]
    assert third == f"{BOS}Sys{USER}Sure?{ASSISTANT}<think>" and fork == len(third) - len("<think>")
    assert ui.shown[-2:] == [("reasoning", "hmm"), ("answer", "Yes")]
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["messages"] == [
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes", "reasoning_content": "hmm"},
    ]
    assert saved["system"] == "Sys" and saved["thinking"] is True


def test_ctrl_c_stops_the_answer_and_keeps_the_session(renderer: PromptRenderer) -> None:
    engine = ScriptedEngine(["a", "b", "c", "d"], ["next"])
    session = ChatSession(engine, renderer)
    ui = ScriptedUI(["Go", "More"], interrupt_after=2)
    run_repl(session, ui)
    assert ui.turns[0].interrupted and ui.turns[0].answer == "ab"
    assert not ui.turns[1].interrupted
    # The partial answer stays in history, exactly as the user saw it.
    assert engine.prompts[1][0].endswith(f"{USER}Go{ASSISTANT}</think>ab{EOS}{USER}More{ASSISTANT}</think>")


def test_a_full_context_is_reported_and_the_session_goes_on(renderer: PromptRenderer) -> None:
    engine = ScriptedEngine(["ok"], UsageError("the conversation has 9 tokens, the context holds 8", hint="/reset"))
    session = ChatSession(engine, renderer)
    ui = ScriptedUI(["One", "Two", "/help"])
    run_repl(session, ui)
    assert ui.notes[0] == "error: the conversation has 9 tokens, the context holds 8 (/reset)"
    assert [m["content"] for m in session.history] == ["One", "ok"]  # the failed turn is not in history
    assert len(ui.turns) == 1 and "/reset" in ui.notes[1]  # and the REPL went on


def test_commands_exit_load_and_errors(renderer: PromptRenderer, tmp_path: Path) -> None:
    saved = tmp_path / "conv.json"
    saved.write_text(json.dumps({"system": None, "messages": [{"role": "user", "content": "x"}]}))
    session = ChatSession(ScriptedEngine(), renderer)
    ui = ScriptedUI(["/help", "/bogus", f"/load {saved}", "/load /nonexistent.json", "/think maybe", "/exit", "Hi"])
    run_repl(session, ui)
    assert ui.lines == ["Hi"]  # /exit left before reading on
    assert "/save FILE" in ui.notes[0]
    assert ui.notes[1].startswith("unknown command /bogus")
    assert session.history == [{"role": "user", "content": "x"}]
    assert ui.notes[3].startswith("error: cannot load conversation from /nonexistent.json")
    assert ui.notes[4] == "usage: /think on|off"


# -- header checks --------------------------------------------------------------------------------------


def test_tiny_gguf_passes_the_header_check(tiny_gguf: Path) -> None:
    info = check_gguf(tiny_gguf)
    assert info.arch == "deepseek4" and info.bos_token == BOS and info.eos_token == EOS
    assert info.chat_template and info.block_count == 4


@pytest.mark.parametrize(
    ("lines", "turn"),
    [
        (["\x1b[200~one", "two", "three\x1b[201~"], "one\ntwo\nthree"),  # a reader that passes the markers through
        (['"""', "a", 'b"""'], "a\nb"),
        (['"""x', "y", '"""'], "x\ny"),
        (['"""single"""'], "single"),
        (["plain"], "plain"),
    ],
)
def test_read_turn_joins_pasted_and_triple_quoted_lines(lines: list[str], turn: str) -> None:
    pending = iter(lines)
    assert read_turn(lambda prompt: next(pending)) == turn
    assert next(pending, None) is None  # read exactly the block
