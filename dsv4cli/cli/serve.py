"""`dsv4 serve`: the model behind an OpenAI-compatible API (llama.cpp's llama-server, placed by the plan)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dsv4cli.cli.options import (
    CpuOpt,
    CtxOpt,
    JsonOpt,
    ModelArg,
    ParallelOpt,
    PlanFileOpt,
    RamOpt,
    RpcOpt,
    VramOpt,
    placement,
)
from dsv4cli.ui import note, out

if TYPE_CHECKING:
    from dsv4cli.server.launch import RunningServer

SERVE_EXAMPLES = """\b
Examples:
  dsv4 serve tiny                                  # the built-in test model on http://127.0.0.1:8080/v1
  dsv4 serve deepseek-v4-flash --vram 24 --ram 128 --ctx 32768 --port 8000
  dsv4 serve model.gguf --plan plan.json --host 0.0.0.0 --api-key-file ~/.dsv4-key
  dsv4 serve tiny --port 0 --json                  # any free port; one JSON line with base_url and pid"""


def _snippet(server: RunningServer, keyed: bool) -> str:
    key = '"<your key>"' if keyed else '"dsv4"'
    return (
        "from openai import OpenAI\n\n"
        + ("" if keyed else "# no key is set: any api_key string works\n")
        + f'client = OpenAI(base_url="{server.base_url}/v1", api_key={key})\n'
        f'reply = client.chat.completions.create(model="{server.alias}", '
        'messages=[{"role": "user", "content": "Hello"}])\n'
        "print(reply.choices[0].message.content)"
    )


def register(app: typer.Typer) -> None:
    @app.command(epilog=SERVE_EXAMPLES)
    def serve(
        model: ModelArg,
        host: Annotated[
            str, typer.Option(help="Address to listen on; anything but loopback needs a key.")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 8080,
        api_key: Annotated[
            str | None,
            typer.Option(
                "--api-key", help="Key clients must send (Bearer); visible in `ps`: prefer DSV4_API_KEY or a file."
            ),
        ] = None,
        api_key_file: Annotated[
            Path | None, typer.Option("--api-key-file", help="File with keys, one per line.")
        ] = None,
        alias: Annotated[str | None, typer.Option(help="Model id clients use (default: MODEL as given).")] = None,
        think: Annotated[
            bool, typer.Option("--think/--no-think", help="Thinking by default (clients can override per request).")
        ] = False,
        mtp: Annotated[bool, typer.Option("--mtp/--no-mtp", help="MTP drafting when the GGUF has the block.")] = True,
        parallel: ParallelOpt = None,
        plan: PlanFileOpt = None,
        vram: VramOpt = None,
        ram: RamOpt = None,
        cpu: CpuOpt = False,
        ctx: CtxOpt = None,
        engine_bin: Annotated[
            Path | None, typer.Option("--engine-bin", help="llama-server to run (default: `dsv4 engine build`'s).")
        ] = None,
        rpc: RpcOpt = None,
        json_output: JsonOpt = False,
    ) -> None:
        """Serve a model on an OpenAI-compatible API until Ctrl-C."""
        from dsv4cli.models.ref import resolve_model
        from dsv4cli.server.launch import ServeOptions, check_access, start_server
        from dsv4cli.server.supervise import supervise
        from dsv4cli.toolchain.build import find_engine

        where = placement(plan, vram, ram, ctx, cpu, rpc)
        opts = ServeOptions(
            host=host,
            port=port,
            api_key=api_key if api_key is not None else os.environ.get("DSV4_API_KEY"),
            api_key_file=api_key_file,
            alias=alias,
            think=think,
            mtp=mtp,
            parallel=parallel,
        )
        check_access(opts)  # before the engine and the model: the cheapest refusal first
        engine = find_engine(engine_bin)
        ref = resolve_model(model)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds like Ctrl-C: the server stops
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a shell started us ignoring it (`&`)
        server = start_server(ref, where, opts, engine, note=note)
        try:
            if json_output:
                sys.stdout.write(json.dumps(server.info()) + "\n")
                sys.stdout.flush()
            else:
                _announce(server, keyed=opts.api_key is not None or api_key_file is not None)
            supervise(server, note=note)
        except KeyboardInterrupt:
            note("stopping llama-server")
        finally:
            server.stop()


def _announce(server: RunningServer, *, keyed: bool) -> None:
    mtp = ", MTP drafting" if server.mtp else ""
    out.print(f"serving {server.alias} ({server.model.gguf.name}{mtp}) at {server.base_url}/v1", markup=False)
    out.print(f"chat page: {server.base_url}/", markup=False)
    out.print(_snippet(server, keyed), markup=False)
    note(f"llama-server pid {server.process.pid}, log {server.process.log}; Ctrl-C to stop")
