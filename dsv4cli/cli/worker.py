"""`dsv4 worker`: lend this machine's memory to a model served elsewhere (llama.cpp's ggml-rpc-server)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dsv4cli.cli.options import MAX_GIB, JsonOpt, check_threads, in_range
from dsv4cli.ui import err, out
from dsv4cli.units import human_bytes

if TYPE_CHECKING:
    from dsv4cli.rpc.worker import RunningWorker

WORKER_EXAMPLES = """\b
Examples:
  dsv4 worker --mem 48                              # 127.0.0.1:50052, at most 48 GiB (reach it over ssh -L)
  dsv4 worker --host 0.0.0.0 --allow-remote --mem 96  # on a trusted LAN
  then, on the machine that serves:  dsv4 serve MODEL --rpc HOST1:50052,HOST2:50052"""


def register(app: typer.Typer) -> None:
    @app.command(epilog=WORKER_EXAMPLES)
    def worker(
        host: Annotated[str, typer.Option(help="Address to listen on (loopback unless --allow-remote).")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 50052,
        mem: Annotated[
            float | None,
            typer.Option(
                "--mem",
                callback=in_range("--mem", 0, MAX_GIB, above=True),
                help="GiB this worker lends (default: what its device reports).",
            ),
        ] = None,
        threads: Annotated[
            int | None,
            typer.Option(callback=check_threads, help="CPU threads (default: llama.cpp's, half the cores)."),
        ] = None,
        allow_remote: Annotated[
            bool, typer.Option("--allow-remote", help="Allow a non-loopback --host (no auth, no encryption).")
        ] = False,
        engine_bin: Annotated[
            Path | None,
            typer.Option("--engine-bin", help="llama-server whose ggml-rpc-server runs (default: the engine build's)."),
        ] = None,
        json_output: JsonOpt = False,
    ) -> None:
        """Run an RPC worker that holds part of a model for `dsv4 serve --rpc`, until Ctrl-C."""
        from dsv4cli.rpc.worker import REMOTE_WARNING, WorkerOptions, check_worker_options, start_worker
        from dsv4cli.toolchain.build import find_engine

        opts = WorkerOptions(host=host, port=port, mem_gib=mem, threads=threads, allow_remote=allow_remote)
        check_worker_options(opts)
        engine = find_engine(engine_bin)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        running = start_worker(opts, engine, note=lambda line: err.print(line, markup=False))
        try:
            if running.remote:
                err.print(f"warning: {REMOTE_WARNING.format(address=running.address)}", markup=False)
            if json_output:
                sys.stdout.write(json.dumps(running.info()) + "\n")
                sys.stdout.flush()
            else:
                _announce(running)
            running.serve_forever()
        except KeyboardInterrupt:
            err.print("stopping the worker", markup=False)
        finally:
            running.stop()


def _announce(running: RunningWorker) -> None:
    for d in running.devices:
        out.print(f"device {d['name']}: {d['description']}, {human_bytes(int(d['free_bytes']))} free", markup=False)
    lends = human_bytes(running.budget) if running.budget is not None else "all of it"
    out.print(f"worker at {running.address}, lending {lends}", markup=False)
    out.print(f"on the serving machine: dsv4 serve MODEL --rpc {running.address}", markup=False)
    err.print(f"ggml-rpc-server pid {running.process.pid}, log {running.process.log}; Ctrl-C to stop", markup=False)
