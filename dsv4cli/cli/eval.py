"""`dsv4 eval`: what a quant costs in fidelity against a reference (KL divergence, top-1 agreement, perplexity)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dsv4cli.cli.options import (
    CpuOpt,
    JsonOpt,
    ModelArg,
    PlanFileOpt,
    RamOpt,
    RpcOpt,
    UntunedOpt,
    VramOpt,
    placement,
)
from dsv4cli.eval.text import MIN_CTX
from dsv4cli.ui import err, note, out, print_json

if TYPE_CHECKING:
    from dsv4cli.eval.run import EvalResult

EVAL_EXAMPLES = """\b
Examples:
  dsv4 eval tiny-q4_0-q8_0.gguf                      # against the lossless conversion of the same checkpoint
  dsv4 eval unsloth/DeepSeek-V4-Flash-GGUF:UD-Q2_K_XL  # against the largest other pulled quant of that repo
  dsv4 eval model.gguf --ref ref.gguf --text my.txt --ctx 1024 --chunks 20 --json"""


def register(app: typer.Typer) -> None:
    @app.command(name="eval", epilog=EVAL_EXAMPLES)
    def eval_command(
        model: ModelArg,
        ref: Annotated[
            str | None,
            typer.Option("--ref", help="Reference model (default: the lossless conversion or a larger quant)."),
        ] = None,
        text: Annotated[
            Path | None, typer.Option("--text", help="UTF-8 text to score (default: the built-in mixed text).")
        ] = None,
        ctx: Annotated[int, typer.Option("--ctx", min=MIN_CTX, max=131072, help="Tokens per scored chunk.")] = 512,
        chunks: Annotated[
            int | None, typer.Option("--chunks", min=1, help="Score at most this many chunks (default: all).")
        ] = None,
        plan: PlanFileOpt = None,
        vram: VramOpt = None,
        ram: RamOpt = None,
        cpu: CpuOpt = False,
        rpc: RpcOpt = None,
        untuned: UntunedOpt = False,
        json_output: JsonOpt = False,
    ) -> None:
        """Measure a model's KL divergence, top-1 agreement and perplexity against a reference, with llama.cpp's
        llama-perplexity; the result is recorded beside the model (`dsv4 show`)."""
        from dsv4cli.eval.run import EvalOptions, evaluate
        from dsv4cli.models.ref import resolve_model

        options = EvalOptions(
            ref=resolve_model(ref) if ref else None,
            text=text.expanduser() if text else None,
            ctx=ctx,
            chunks=chunks,
            placement=placement(plan, vram, ram, None, cpu, rpc, untuned=untuned),
        )
        try:
            with _chunk_progress() as bar:
                tasks: dict[str, int] = {}

                def progress(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total)
                    bar.update(tasks[stage], completed=done)

                result = evaluate(resolve_model(model), options, note=note, progress=progress)
        except KeyboardInterrupt:  # after the bar's last frame, so this is the last line
            err.print("interrupted: no result recorded; the reference logits cache holds only complete files")
            sys.exit(130)  # not typer.Exit(130): `main` reads that code as Ctrl-C and prints its own line too
        if json_output:
            print_json(result.to_json())
            return
        _render(result)


def _chunk_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks"),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal and os.environ.get("DSV4_PROGRESS") != "1",
    )


def _render(r: EvalResult) -> None:
    k = r.kld

    def opt(x: float | None) -> str:
        return "-" if x is None else f"{x:.6f}"

    out.print(f"{r.model.name} against {r.reference.name}", markup=False)
    out.print(f"  text {r.text}, {r.chunks} chunks of {r.ctx} tokens, {r.tokens} tokens scored", markup=False)
    out.print(f"  PPL        {k.ppl:.4f} ± {k.ppl_err:.4f}   (reference {k.ppl_ref:.4f} ± {k.ppl_ref_err:.4f})")
    out.print(f"  KLD        mean {k.kld_mean:.6f} ± {k.kld_mean_err:.6f}, median {opt(k.kld_median)}")
    out.print(f"             99% {opt(k.kld_p99)}, 99.9% {opt(k.kld_p999)}, max {opt(k.kld_max)}")
    out.print(f"  top-1      {k.top1:.2%} same token")
    out.print(f"  RMS Δp     {k.rms_dp:.3%}")
    cache = "reused (cached)" if r.cache_reused else f"{r.ref_seconds:.0f} s"
    out.print(f"  time       model {r.seconds:.0f} s, reference logits {cache}")
