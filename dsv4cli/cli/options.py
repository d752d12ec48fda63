"""Option types shared by several commands, so the same flag reads the same everywhere.

Values from a fixed vocabulary (recipes, KV cache types) are checked when the command line is parsed, before any
work starts; the error names the flag and the allowed values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dsv4cli.errors import UsageError
from dsv4cli.kvcache import KV_TYPES
from quant.recipes import DENSE_RECIPES, EXPERT_RECIPES

if TYPE_CHECKING:
    from dsv4cli.chat import Placement


def _one_of(flag: str, allowed: Iterable[str]) -> Callable[[str | None], str | None]:
    choices = tuple(allowed)

    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise UsageError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        return value

    return check


def gib_list(value: str | None) -> tuple[float, ...] | None:
    """'24,24' -> (24.0, 24.0): one budget per GPU."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as e:
        raise UsageError(f"--vram {value!r}: expected GiB per GPU, e.g. 24 or 24,24") from e


def _check_gib_list(value: str | None) -> str | None:
    gib_list(value)
    return value


ModelArg = Annotated[
    str,
    typer.Argument(help="Registry name (see `dsv4 models`), Hub repo id `org/name`, either with `:TAG`, or a path."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
VramOpt = Annotated[
    str | None,
    typer.Option(
        "--vram", callback=_check_gib_list, help="GiB per GPU, comma-separated, e.g. 24 or 24,24 (default: detected)."
    ),
]
RamOpt = Annotated[float | None, typer.Option("--ram", help="Host RAM budget in GiB (default: available now).")]
ExpertsOpt = Annotated[
    str,
    typer.Option(
        "--experts",
        callback=_one_of("--experts", EXPERT_RECIPES),
        help=f"Routed-expert recipe: {', '.join(EXPERT_RECIPES)} (mxfp4 is lossless for FP4 releases).",
    ),
]
DenseOpt = Annotated[
    str,
    typer.Option(
        "--dense", callback=_one_of("--dense", DENSE_RECIPES), help=f"Dense recipe: {', '.join(DENSE_RECIPES)}."
    ),
]
KvTypeOpt = Annotated[
    str,
    typer.Option("--kv-type", callback=_one_of("--kv-type", KV_TYPES), help=f"KV cache type: {', '.join(KV_TYPES)}."),
]
PlanFileOpt = Annotated[Path | None, typer.Option("--plan", help="Apply a plan written by `dsv4 plan -o`.")]
CpuOpt = Annotated[bool, typer.Option("--cpu", help="Run on the CPU only, even where a GPU is found.")]
CtxOpt = Annotated[int | None, typer.Option("--ctx", min=64, help="Context length in tokens.")]


def placement(plan: Path | None, vram: str | None, ram: float | None, ctx: int | None, cpu: bool) -> Placement:
    """The placement flags of the commands that load a model (chat, serve), checked the same way for both."""
    from dsv4cli.chat import Placement

    if plan and (vram is not None or ram is not None or ctx is not None):
        raise UsageError("--plan already fixes placement and context; drop --vram/--ram/--ctx or the plan")
    if cpu and (vram is not None or plan):
        raise UsageError("--cpu plans no GPU; drop --vram/--plan or --cpu")
    return Placement(plan_file=plan, vram_gib=gib_list(vram), ram_gib=ram, ctx=ctx, cpu=cpu)
