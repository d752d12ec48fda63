"""`dsv4 chat`: parse options, prepare the model (`dsv4cli.load`), start its engine, and render the conversation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dsv4cli.cli.options import (
    CpuOpt,
    CtxOpt,
    JsonOpt,
    PlanFileOpt,
    RamOpt,
    RpcOpt,
    UntunedOpt,
    VramOpt,
    one_of,
    placement,
)
from dsv4cli.errors import UsageError
from dsv4cli.load.engines import DEFAULT_ENGINE, ENGINES
from dsv4cli.ui import err, note, out, print_json
from quant.errors import printable

if TYPE_CHECKING:
    from dsv4cli.chat.session import ChatSession, TurnResult

EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        callback=one_of("--engine", ENGINES),
        help="inprocess: llama.cpp in this process; server: the engine build's llama-server (GPU build, --rpc, MTP).",
    ),
]
CHAT_EXAMPLES = """\b
Examples:
  dsv4 chat                                   # the built-in tiny test model
  dsv4 chat deepseek-v4-flash --vram 24 --ram 128 --ctx 32768
  dsv4 chat model.gguf --plan plan.json --think
  dsv4 chat unsloth/DeepSeek-V4-Flash-GGUF:UD-Q2_K_XL   # after `dsv4 pull` of the same name
  echo "Why is the sky blue?" | dsv4 chat deepseek-v4-flash --json"""


class TerminalUI:
    """The interactive terminal: readline line editing and history, streamed text, dimmed reasoning; a pasted
    block is one turn (bracketed paste), and so is a block typed between triple-quote lines."""

    def __init__(self, history_file: Path) -> None:
        import readline  # importing it gives input() line editing and history

        from dsv4cli.chat.session import load_history

        self._readline = readline
        self._history = history_file
        load_history(readline, history_file)
        readline.parse_and_bind("set enable-bracketed-paste on")
        if "libedit" not in (readline.__doc__ or ""):  # GNU readline: pass the paste markers to `read_turn`
            readline.parse_and_bind(r'"\e[200~": "\C-v\e[200~"')
            readline.parse_and_bind(r'"\e[201~": "\C-v\e[201~"')
        self._paste_mode(True)

    def _paste_mode(self, on: bool) -> None:
        """Ask the terminal to mark pasted text (xterm's mode 2004), so a paste is not sent line by line."""
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[?2004h" if on else "\x1b[?2004l")
            sys.stdout.flush()

    def read_line(self) -> str:
        from dsv4cli.chat.session import read_turn

        return read_turn(input)

    def piece(self, kind: str, text: str) -> None:
        text = printable(text, keep="\n\t")  # the model's output may hold escape sequences
        out.print(text, style="dim" if kind == "reasoning" else None, end="", markup=False)
        out.file.flush()

    def end_answer(self, turn: TurnResult) -> None:
        from dsv4cli.chat.session import format_stats

        out.print()
        if turn.interrupted:
            err.print("[interrupted]", style="yellow", markup=False)
        err.print(format_stats(turn.stats), style="dim", markup=False)

    def note(self, message: str) -> None:
        note(printable(message, keep="\n"))

    def close(self) -> None:
        from dsv4cli.chat.session import save_history

        self._paste_mode(False)
        save_history(self._readline, self._history)


def register(app: typer.Typer) -> None:
    @app.command(epilog=CHAT_EXAMPLES)
    def chat(
        model: Annotated[
            str | None,
            typer.Argument(
                help="GGUF path, registry name, GGUF repo `org/name:TAG` or `org/name/file.gguf`; "
                "default: the built-in tiny test model."
            ),
        ] = None,
        prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Answer this prompt and exit.")] = None,
        system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
        think: Annotated[bool, typer.Option("--think/--no-think", help="Thinking mode (reasoning first).")] = False,
        plan: PlanFileOpt = None,
        vram: VramOpt = None,
        ram: RamOpt = None,
        cpu: CpuOpt = False,
        ctx: CtxOpt = None,
        untuned: UntunedOpt = False,
        max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens per answer.")] = 2048,
        temp: Annotated[float, typer.Option("--temp", min=0.0, max=2.0, help="Temperature; 0 = greedy.")] = 0.7,
        top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = 0.95,
        seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed (default: random).")] = None,
        verbose: Annotated[bool, typer.Option("--verbose", help="Show llama.cpp's log on stderr.")] = False,
        rpc: RpcOpt = None,
        engine: EngineOpt = DEFAULT_ENGINE,
        as_json: JsonOpt = False,
    ) -> None:
        """Chat with a DeepSeek V4 GGUF: a streaming REPL, or one answer for -p / a prompt on stdin."""
        from dsv4cli.chat.session import ChatSession
        from dsv4cli.engine import SampleOptions
        from dsv4cli.load.engines import open_engine
        from dsv4cli.load.prepared import prepare_model
        from dsv4cli.models.ref import resolve_model

        if rpc and engine != "server":
            raise UsageError(
                "--rpc: chat runs llama.cpp in process, which does not load across machines",
                hint=f"chat through llama-server with `dsv4 chat MODEL --engine server --rpc {rpc}`, or serve it "
                f"across the workers with `dsv4 serve MODEL --rpc {rpc}` and chat through its API",
            )
        where = placement(plan, vram, ram, ctx, cpu, rpc, untuned=untuned)
        if prompt is None and not sys.stdin.isatty():
            prompt = _read_stdin_prompt()
            if not prompt.strip():
                raise UsageError("stdin is not a terminal and holds no prompt", hint="pass -p TEXT or pipe a prompt")
        if as_json and prompt is None:
            raise UsageError("--json needs a prompt (-p or stdin)")
        prepared = prepare_model(model and resolve_model(model), where, note=note)
        renderer = prepared.renderer  # a template that cannot render fails before the model loads
        runner = open_engine(engine, prepared, verbose=verbose, note=note)
        options = SampleOptions(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
        session = ChatSession(runner, renderer, system=system, thinking=think, options=options)
        try:
            if prompt is None:
                _interactive(session, prepared.gguf)
            else:
                _one_shot(session, prompt, gguf=prepared.gguf, as_json=as_json)
        finally:
            runner.close()


def _read_stdin_prompt() -> str:
    """The piped prompt, at most MAX_PROMPT_BYTES (`cat /dev/zero | dsv4 chat` must not fill memory); bytes that are
    not UTF-8 become U+FFFD."""
    from dsv4cli.chat.template_sandbox import MAX_OUTPUT_CHARS

    data = sys.stdin.buffer.read(MAX_OUTPUT_CHARS + 1)
    if len(data) > MAX_OUTPUT_CHARS:
        raise UsageError(f"the prompt on stdin is longer than {MAX_OUTPUT_CHARS} bytes", hint="pipe a shorter prompt")
    return data.decode("utf-8", errors="replace")


def _interactive(session: ChatSession, gguf: Path) -> None:
    from dsv4cli.chat.session import run_repl
    from dsv4cli.home import dsv4_home

    ui = TerminalUI(dsv4_home() / "chat_history")
    note(f"{gguf.name} loaded; /help for commands, Ctrl-D to leave")
    try:
        run_repl(session, ui)
    finally:
        ui.close()


def _one_shot(session: ChatSession, prompt: str, *, gguf: Path, as_json: bool) -> None:
    """Only the answer on stdout (reasoning and stats on stderr), or one JSON object with --json."""
    from dsv4cli.chat.session import format_stats

    for kind, text in session.send(prompt):
        if not as_json:
            stream = sys.stdout if kind == "answer" else sys.stderr
            stream.write(printable(text, keep="\n\t") if stream.isatty() else text)
            stream.flush()
    turn = session.last
    if as_json:
        print_json({"model": str(gguf), **turn.to_dict()})
    else:
        sys.stdout.write("\n")
        note(format_stats(turn.stats))
