"""`dsv4 imatrix`: an importance matrix from the model itself, with its per-expert token coverage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsv4cli.cli.options import JsonOpt, ModelArg
from dsv4cli.ui import out, print_json

EXAMPLES = """\b
Examples:
  dsv4 imatrix tiny                           # the built-in calibration text through tiny's lossless GGUF
  dsv4 imatrix deepseek-v4-flash --text my-domain.txt
  dsv4 quantize deepseek-v4-flash --size 90G  # uses the cached matrix
"""


def imatrix(
    model: ModelArg,
    text: Annotated[
        Path | None, typer.Option("--text", help="Calibration text (UTF-8); default: the built-in mixed text.")
    ] = None,
    chunk: Annotated[int, typer.Option("--chunk", min=16, help="Tokens per calibration chunk.")] = 256,
    chunks: Annotated[int, typer.Option("--chunks", min=0, help="At most this many chunks (0 = all).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Compute it again even if cached.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Run calibration text through MODEL's lossless GGUF and cache per-tensor, per-expert activation statistics."""
    from dsv4cli.models.imatrix import expert_coverage, make_imatrix

    path, result, cached = make_imatrix(model, text_file=text, chunk=chunk, max_chunks=chunks, force=force)
    coverage = expert_coverage(result)
    if json_output:
        print_json(
            {
                "file": str(path),
                "cached": cached,
                "tokens": result.tokens,
                "chunks": result.chunks,
                "dataset": result.dataset,
                "floor": result.floor,
                "tensors": len(result.sums),
                "experts": [vars(c) for c in coverage],
            }
        )
        return
    state = "cached" if cached else "wrote"
    out.print(f"{state} {path}")
    out.print(f"  {result.tokens} tokens in {result.chunks} chunks of {result.dataset}; {len(result.sums)} tensors")
    below = sum(len(c.below_floor) for c in coverage)
    total = sum(c.experts for c in coverage)
    out.print(
        f"  routed experts: {total - below}/{total} reached by at least {result.floor} tokens; the {below} others "
        "are topped up with their layer's mean (none is skipped)"
    )
    for c in coverage:
        few = f"; below {result.floor}: {c.below_floor[:12]}{' ...' if len(c.below_floor) > 12 else ''}"
        out.print(
            f"    layer {c.layer}: {c.experts} experts, {c.fewest}-{c.most} tokens each{few if c.below_floor else ''}"
        )


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(imatrix)
