"""`dsv4 engine`: build or check the llama-server that `dsv4 serve` runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dsv4cli.cli.options import JsonOpt
from dsv4cli.ui import err, out, print_json

engine_app = typer.Typer(help="Build or check the llama-server engine behind `dsv4 serve`.", no_args_is_help=True)


@engine_app.command("build")
def build(
    gpu: Annotated[str, typer.Option(help="Backend: cpu, cuda, rocm, vulkan or metal.")] = "cpu",
    jobs: Annotated[
        int | None, typer.Option("-j", "--jobs", help="Parallel compile jobs (default: all cores).")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Build llama-server and its tools (rpc-server, bench, perplexity, quantize) from the pinned llama.cpp (cached)."""
    from dsv4cli.toolchain.build import build_engine

    live = err.is_terminal or os.environ.get("DSV4_PROGRESS") == "1"
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not live,
    ) as progress:
        task = progress.add_task(f"llama.cpp ({gpu})", total=None)

        def stage(text: str) -> None:
            progress.update(task, description=f"llama.cpp ({gpu}): {text}")
            if not live:  # in a log (make setup, CI): one line per stage instead of a bar
                err.print(f"llama.cpp ({gpu}): {text}", markup=False)

        result = build_engine(
            gpu,
            jobs=jobs,
            on_stage=stage,
            on_step=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if json_output:
        print_json(
            {
                **result.engine.to_json(),
                "path": str(result.path),
                "cached": result.cached,
                "seconds": round(result.seconds, 1),
            }
        )
        return
    how = "already built" if result.cached else f"built in {result.seconds / 60:.1f} min"
    out.print(f"llama-server {result.engine.version} ({gpu}): {how}\n{result.engine.server}")


@engine_app.command("check")
def check(
    engine_bin: Annotated[
        Path | None, typer.Option("--engine-bin", help="A llama-server binary to use instead of the built one.")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Show which llama-server `dsv4 serve` would run, after checking it answers `--version`."""
    from dsv4cli.toolchain.build import find_engine

    engine = find_engine(engine_bin)
    if json_output:
        print_json(engine.to_json())
        return
    out.print(f"llama-server {engine.version} ({engine.gpu or 'user-supplied'})\n{engine.server}")


def register(app: typer.Typer) -> None:
    app.add_typer(engine_app, name="engine")
