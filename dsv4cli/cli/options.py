"""Option types shared by several commands, so the same flag reads the same everywhere.

Values from a fixed vocabulary (recipes, KV cache types) and numbers (threads, context, batch, GiB, GB/s) are checked
when the command line is parsed, before any work starts, against what llama.cpp and this machine can take
(`dsv4cli.engine.params`); the error names the flag and the allowed values.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dsv4cli.engine.kvcache import KV_TYPES
from dsv4cli.engine.params import MAX_BATCH, MAX_CTX, MAX_GPUS, MAX_SEQ, max_threads
from dsv4cli.errors import UsageError
from quant.errors import printable
from quant.recipes import DENSE_RECIPES, EXPERT_RECIPES

if TYPE_CHECKING:
    from dsv4cli.load.placement import Placement


def one_of(flag: str, allowed: Iterable[str]) -> Callable[[str | None], str | None]:
    choices = tuple(allowed)

    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise UsageError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        return value

    return check


MAX_GIB = float(1 << 20)  # 1 PiB of RAM or VRAM: anything above is a typo
MAX_GBS = 1e5  # GB/s: ten times the fastest memory there is
RPC_HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def in_range(flag: str, lo: float, hi: float, *, above: bool = False) -> Callable[[float | None], float | None]:
    """A callback accepting None or a finite number in lo..hi (above lo only, when `above`)."""

    def check(value: float | None) -> float | None:
        if value is None:
            return None
        if not ((lo < value <= hi) if above else (lo <= value <= hi)):  # NaN compares false
            raise UsageError(f"{flag} {value:g}: expected a number {'above' if above else 'from'} {lo:.0f} to {hi:.0f}")
        return value

    return check


def check_threads(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= max_threads():
        raise UsageError(
            f"--threads {value}: this machine has {os.cpu_count()} logical CPUs; use 1..{max_threads()}",
            hint="leave it out for the command's default",
        )
    return value


def _whole(flag: str, lo: int, hi: int) -> Callable[[int | None], int | None]:
    def check(value: int | None) -> int | None:
        if value is not None and not lo <= value <= hi:
            raise UsageError(f"{flag} {value}: expected {lo}..{hi}")
        return value

    return check


def gib_list(value: str | None) -> tuple[float, ...] | None:
    """'24,24' -> (24.0, 24.0): one budget per GPU, each positive and finite."""
    if value is None:
        return None
    try:
        budgets = tuple(float(v) for v in value.split(","))
    except ValueError as e:
        raise UsageError(f"--vram {value!r}: expected GiB per GPU, e.g. 24 or 24,24") from e
    if len(budgets) > MAX_GPUS or not all(math.isfinite(v) and 0 < v <= MAX_GIB for v in budgets):
        raise UsageError(f"--vram {value!r}: expected 1..{MAX_GPUS} GiB budgets above 0, e.g. 24 or 24,24")
    return budgets


def _check_gib_list(value: str | None) -> str | None:
    gib_list(value)
    return value


ModelArg = Annotated[
    str,
    typer.Argument(
        help="Registry name (see `dsv4 models`), Hub repo id `org/name`, either with `:TAG`, "
        "`org/name/file.gguf`, or a path."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
VramOpt = Annotated[
    str | None,
    typer.Option(
        "--vram", callback=_check_gib_list, help="GiB per GPU, comma-separated, e.g. 24 or 24,24 (default: detected)."
    ),
]
RamOpt = Annotated[
    float | None,
    typer.Option(
        "--ram",
        callback=in_range("--ram", 0, MAX_GIB, above=True),
        help="Host RAM budget in GiB (default: available).",
    ),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", callback=check_threads, help="CPU threads (default: physical cores).")
]
CtxOpt = Annotated[
    int | None,
    typer.Option(
        "--ctx", callback=_whole("--ctx", 64, MAX_CTX), help="Context length in tokens (default: 32768 or the model's)."
    ),
]
ParallelOpt = Annotated[
    int | None,
    typer.Option(
        "--parallel", callback=_whole("--parallel", 1, MAX_SEQ), help="Request slots (default: llama-server's, 4)."
    ),
]
UbatchOpt = Annotated[
    int | None,
    typer.Option(
        "--ubatch",
        callback=_whole("--ubatch", 1, MAX_BATCH),
        help="Micro-batch size (compute buffer; default: tuned, else 512).",
    ),
]
MarginOpt = Annotated[
    float, typer.Option("--margin", callback=in_range("--margin", 0, MAX_GIB), help="GiB kept free on each GPU.")
]


def bandwidth_opt(flag: str, what: str) -> object:
    """A GB/s option (`--ram-bw` ...): positive, finite, below MAX_GBS."""
    return typer.Option(flag, callback=in_range(flag, 0, MAX_GBS, above=True), help=f"{what} GB/s.")


ExpertsOpt = Annotated[
    str,
    typer.Option(
        "--experts",
        callback=one_of("--experts", EXPERT_RECIPES),
        help=f"Routed-expert recipe: {', '.join(EXPERT_RECIPES)} (mxfp4 is lossless for FP4 releases).",
    ),
]
DenseOpt = Annotated[
    str,
    typer.Option(
        "--dense", callback=one_of("--dense", DENSE_RECIPES), help=f"Dense recipe: {', '.join(DENSE_RECIPES)}."
    ),
]
KvTypeOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-type",
        callback=one_of("--kv-type", KV_TYPES),
        help=f"KV cache type: {', '.join(KV_TYPES)} (default: tuned, else f16).",
    ),
]
PlanFileOpt = Annotated[Path | None, typer.Option("--plan", help="Apply a plan written by `dsv4 plan -o`.")]
UntunedOpt = Annotated[
    bool, typer.Option("--untuned", help="Ignore the settings `dsv4 tune` measured here; use the default rules.")
]
CpuOpt = Annotated[bool, typer.Option("--cpu", help="Run on the CPU only, even where a GPU is found.")]


def placement(
    plan: Path | None,
    vram: str | None,
    ram: float | None,
    ctx: int | None,
    cpu: bool,
    rpc: str | None = None,
    *,
    untuned: bool = False,
) -> Placement:
    """The placement flags of the commands that load a model (chat, serve), checked the same way for both."""
    from dsv4cli.load.placement import Placement
    from dsv4cli.rpc.protocol import parse_endpoints

    if plan and (vram is not None or ram is not None or ctx is not None):
        raise UsageError("--plan already fixes placement and context; drop --vram/--ram/--ctx or the plan")
    if cpu and (vram is not None or plan):
        raise UsageError("--cpu plans no GPU; drop --vram/--plan or --cpu")
    if plan and rpc:
        raise UsageError("--plan already names its RPC workers; drop --rpc or the plan")
    endpoints = parse_endpoints(rpc) if rpc else ()
    return Placement(
        plan_file=plan, vram_gib=gib_list(vram), ram_gib=ram, ctx=ctx, cpu=cpu, rpc=endpoints, untuned=untuned
    )


def _check_rpc(value: str | None) -> str | None:
    """HOST:PORT,... as llama.cpp takes it; a host is a name or IPv4 address (no control or other characters that
    would reach a terminal or the resolver raw)."""
    if value is not None:
        from dsv4cli.rpc.protocol import parse_endpoints

        for part in value.split(","):
            host = part.strip().rpartition(":")[0]
            if host and not RPC_HOST_RE.match(host):
                raise UsageError(
                    f"--rpc {printable(part.strip())}: a host may hold only letters, digits, '.', '-' and '_'",
                    hint="e.g. --rpc 192.168.1.10:50052,gpu-box.local:50052",
                )
        parse_endpoints(value)
    return value


RpcOpt = Annotated[
    str | None,
    typer.Option(
        "--rpc",
        callback=_check_rpc,
        help="llama.cpp RPC workers HOST:PORT,HOST:PORT (started with `dsv4 worker`) that hold part of the model.",
    ),
]
