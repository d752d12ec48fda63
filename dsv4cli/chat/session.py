"""`dsv4 chat`'s conversation: the session (history, system prompt, thinking), the REPL and its slash commands.

The REPL talks to an `Engine` (`dsv4cli.engine`: in process or a llama-server child, loaded from
`dsv4cli.load.prepare_model`) and to a `ChatUI` given by the caller, so the loop is the same for the terminal and
for tests; it never imports llama_cpp and loads nothing itself.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dsv4cli.chat.prompt import ChatPrompt, Message, PromptRenderer, ReasoningSplitter
from dsv4cli.engine import Engine, SampleOptions, TurnStats, stop
from dsv4cli.errors import Dsv4Error, UsageError

MAX_CONVERSATION_BYTES = 256 << 20  # a /load file
MAX_HISTORY_BYTES = 16 << 20  # the REPL's line history (1000 lines)
MAX_TURN_CHARS = 1 << 20  # one typed or pasted turn; a longer prompt is piped (`dsv4 chat < FILE`, up to 8 MiB)
_MESSAGE_KEYS = {"role", "content", "reasoning_content"}
HELP = """\
/help             this help
/reset            forget the conversation (keeps the system prompt)
/system [TEXT]    show or set the system prompt (`/system off` clears it)
/think on|off     thinking mode: the model reasons (shown dimmed) before answering
/save FILE        save the conversation as JSON
/load FILE        load a conversation saved with /save
/stats            statistics of the last turn
/exit             leave (or Ctrl-D); Ctrl-C stops the current answer"""


class ChatUI(Protocol):
    def read_line(self) -> str:
        """The next input line; EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C at the prompt."""

    def piece(self, kind: str, text: str) -> None:
        """Show streamed text; kind is "reasoning" or "answer"."""

    def end_answer(self, turn: TurnResult) -> None: ...

    def note(self, message: str) -> None: ...


@dataclass
class TurnResult:
    answer: str
    reasoning: str
    stats: TurnStats
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "reasoning": self.reasoning, "stats": self.stats.to_dict()}


@dataclass
class ChatSession:
    """The conversation: history, system prompt, mode and sampling options, bound to an engine."""

    engine: Engine
    renderer: PromptRenderer
    system: str | None = None
    thinking: bool = False
    options: SampleOptions = field(default_factory=SampleOptions)
    history: list[Message] = field(default_factory=list)
    last: TurnResult | None = None

    def prompt_for(self, text: str) -> ChatPrompt:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.renderer.render([*system, *self.history, {"role": "user", "content": text}], thinking=self.thinking)

    def send(self, text: str) -> Iterator[tuple[str, str]]:
        """Stream ("reasoning" | "answer", text) pieces; the turn enters history even when cut short.

        An interrupt inside the engine ends the turn there and is raised again (KeyboardInterrupt) once the turn
        is recorded, as is one the caller delivers by closing this iterator.
        """
        prompt = self.prompt_for(text)
        splitter = ReasoningSplitter(thinking=self.thinking)
        parts: dict[str, list[str]] = {"reasoning": [], "answer": []}
        stream = self.engine.stream(prompt.text, self.options, fork_at=prompt.fork_at)
        stats: TurnStats | None = None
        outcome = "interrupted"
        try:
            for event in stream:
                if isinstance(event, TurnStats):
                    stats = event
                    break
                for kind, piece in splitter.feed(event):
                    parts[kind].append(piece)
                    yield kind, piece
            for kind, piece in splitter.flush():
                parts[kind].append(piece)
                yield kind, piece
            outcome = "finished" if stats and stats.stopped != "interrupted" else "interrupted"
        except Dsv4Error:
            outcome = "failed"  # e.g. the context is full: the turn does not enter the conversation
            raise
        finally:
            if stats is None and outcome != "failed":
                stats = stop(stream)
            stream.close()
            if outcome != "failed":
                answer, reasoning = "".join(parts["answer"]), "".join(parts["reasoning"])
                self._record(text, answer, reasoning, stats or TurnStats(stopped="interrupted"))
        if outcome == "interrupted":
            raise KeyboardInterrupt

    def _record(self, text: str, answer: str, reasoning: str, stats: TurnStats) -> None:
        message: Message = {"role": "assistant", "content": answer}
        if reasoning:
            message["reasoning_content"] = reasoning
        self.history += [{"role": "user", "content": text}, message]
        self.last = TurnResult(answer, reasoning, stats, interrupted=stats.stopped == "interrupted")

    def reset(self) -> None:
        self.history.clear()
        self.engine.reset()

    def save(self, path: Path) -> None:
        """Write the conversation as JSON, atomically (a failed write leaves the previous file whole)."""
        from dsv4cli.atomic import write_text_atomic

        data = {"system": self.system, "thinking": self.thinking, "messages": self.history}
        try:
            write_text_atomic(path, json.dumps(data, indent=2) + "\n")
        except OSError as e:
            raise UsageError(f"cannot save conversation to {path}: {e.strerror or e}") from e

    def load(self, path: Path) -> None:
        """Replace the conversation with one saved by `save`; a malformed file changes nothing."""
        from quant.errors import QuantError
        from quant.files import load_json

        hint = "use a file written by /save"
        try:
            data = load_json(path, "conversation", limit=MAX_CONVERSATION_BYTES)
        except QuantError as e:
            reason = str(e).removeprefix(str(path)).lstrip(": ")
            raise UsageError(f"cannot load conversation from {path}: {reason}", hint=hint) from e
        problem = _conversation_problem(data)
        if problem:
            raise UsageError(f"cannot load conversation from {path}: {problem}", hint=hint)
        self.system = data.get("system")
        self.thinking = data.get("thinking", self.thinking)
        self.history = [dict(m) for m in data["messages"]]


def _conversation_problem(data: Any) -> str | None:
    """What makes `data` not a conversation saved by /save, or None."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        return "expected an object with a messages list"
    if not isinstance(data.get("system"), (str, type(None))) or not isinstance(data.get("thinking", False), bool):
        return "system must be text or null, thinking true or false"
    for i, m in enumerate(data["messages"]):
        ok = isinstance(m, dict) and m.get("role") in ("user", "assistant") and set(m) <= _MESSAGE_KEYS
        if not ok or not all(isinstance(m.get(k, ""), str) for k in ("content", "reasoning_content")):
            return f"message {i} needs a role user/assistant and text content"
    return None


def load_history(readline: Any, path: Path) -> None:
    """Load the REPL's line history if it is a regular file of sane size (a FIFO or /dev/zero is skipped)."""
    import os
    import stat

    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size <= MAX_HISTORY_BYTES:
            readline.read_history_file(str(path))
    except (OSError, ValueError):
        pass  # no history, or an unreadable one: the REPL works without it


def save_history(readline: Any, path: Path) -> None:
    """Write the line history atomically (temp name, then rename); a failure loses only this session's lines."""
    import contextlib
    import os
    import tempfile

    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            readline.set_history_length(1000)
            readline.write_history_file(tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # bracketed paste (xterm): the terminal wraps pasted text
FENCE = '"""'  # typed multi-line input, as in Ollama: from a line starting with it to a line ending with it


def read_turn(read_line: Callable[[str], str], prompt: str = "> ", more: str = "... ") -> str:
    """One turn of input from a line reader: a pasted block (all its lines), a FENCE block, or one line.

    The reader passes bracketed-paste markers through (the terminal UI binds them so, rather than letting GNU
    readline swallow the paste, which it does until the end marker, Ctrl-D or not), and the lines up to the end
    marker are collected here; EOF (Ctrl-D on an empty line) inside a block raises EOFError like anywhere else.
    A turn longer than MAX_TURN_CHARS is read to its end and refused with UsageError, so the rest of a huge paste
    is never sent as turns of its own.
    """
    line = read_line(prompt)
    size = len(line)
    if PASTE_START in line:
        lines = [line]
        while PASTE_END not in lines[-1]:
            lines.append(read_line(""))
            size += len(lines[-1])
            if size > MAX_TURN_CHARS:
                lines = lines[-1:]  # keep reading to the end marker, but not the text
        text = "\n".join(lines).replace(PASTE_START, "").replace(PASTE_END, "")
    elif line.lstrip().startswith(FENCE):
        lines = [line.lstrip()[len(FENCE) :]]
        while not lines[-1].rstrip().endswith(FENCE) or (len(lines) == 1 and not lines[0].strip()):
            lines.append(read_line(more))
            size += len(lines[-1])
            if size > MAX_TURN_CHARS:
                lines = lines[-1:]
        lines[-1] = lines[-1].rstrip()[: -len(FENCE)]
        text = "\n".join(lines).strip("\n")
    else:
        text = line
    if size > MAX_TURN_CHARS:
        raise UsageError(
            f"that input is {size:,} characters, more than the {MAX_TURN_CHARS:,} one turn may have",
            hint="send a shorter text, or pipe a long prompt: dsv4 chat MODEL < FILE",
        )
    return text


def run_repl(session: ChatSession, ui: ChatUI) -> None:
    """Read lines until Ctrl-D or /exit; Ctrl-C stops an answer and keeps the session."""
    while True:
        try:
            line = ui.read_line()
        except KeyboardInterrupt:
            ui.note("(Ctrl-D or /exit leaves)")
            continue
        except EOFError:
            return
        except Dsv4Error as e:
            ui.note(f"error: {e}" + (f" ({e.hint})" if e.hint else ""))
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(session, ui, line.strip()):
                return
            continue
        turn = session.send(line)
        try:
            for kind, text in turn:
                ui.piece(kind, text)
        except KeyboardInterrupt:
            turn.close()
        except Dsv4Error as e:
            ui.note(f"error: {e}" + (f" ({e.hint})" if e.hint else ""))
            continue
        ui.end_answer(session.last)


def _command(session: ChatSession, ui: ChatUI, line: str) -> bool:
    """Run one slash command; False means leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        ui.note(HELP)
    elif name == "/reset":
        session.reset()
        ui.note("conversation cleared")
    elif name == "/system":
        if arg:
            session.system = None if arg == "off" else arg
        ui.note(f"system prompt: {session.system!r}" if session.system else "no system prompt")
    elif name == "/think":
        if arg not in ("on", "off", ""):
            ui.note("usage: /think on|off")
        else:
            session.thinking = {"on": True, "off": False}.get(arg, session.thinking)
            ui.note(f"thinking {'on' if session.thinking else 'off'}")
    elif name in ("/save", "/load"):
        _file_command(session, ui, name, arg)
    elif name == "/stats":
        ui.note(format_stats(session.last.stats) if session.last else "no turn yet")
    else:
        ui.note(f"unknown command {name}; /help lists the commands")
    return True


def _file_command(session: ChatSession, ui: ChatUI, name: str, arg: str) -> None:
    try:
        [file] = shlex.split(arg)
    except ValueError:
        ui.note(f"usage: {name} FILE")
        return
    path = Path(file).expanduser()
    try:
        if name == "/save":
            session.save(path)
            ui.note(f"saved {len(session.history)} messages to {path}")
        else:
            session.load(path)
            ui.note(f"loaded {len(session.history)} messages from {path}")
    except (OSError, UsageError) as e:
        ui.note(f"error: {e}")


def format_stats(stats: TurnStats) -> str:
    return (
        f"{stats.prompt_tokens} prompt tokens ({stats.prefill_tokens} prefilled, {stats.reused_tokens} reused) "
        f"at {stats.prefill_tps:.1f} tok/s, first token {stats.ttft_s * 1000:.0f} ms, "
        f"{stats.generated_tokens} tokens at {stats.decode_tps:.1f} tok/s"
    )
