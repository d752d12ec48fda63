"""The one place `dsv4 serve` reaches into model resolution and planning, which it shares with `dsv4 chat`.

Serve resolves, checks and places a model exactly as chat does (`dsv4cli.chat.session`), then hands llama-server the
same load parameters as command-line flags (`LoadParams.cli_args`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.chat.session import Placement, load_params, resolve_gguf
from dsv4cli.engine.preflight import check_model_file
from dsv4cli.models.ref import ModelRef
from dsv4cli.rpc.health import check_workers, rpc_endpoints


@dataclass(frozen=True)
class PlannedModel:
    gguf: Path
    llama_args: list[str]  # llama-server flags from the plan, `-m` included
    has_mtp: bool  # the nextn (multi-token prediction) block is in the file


def plan_model(ref: ModelRef | None, placement: Placement, *, note: Callable[[str], None]) -> PlannedModel:
    """Resolve MODEL to a checked GGUF and the llama-server flags of its plan (`--plan FILE` or one made now).

    The flags always load the file being served, even where a plan file names another path.
    """
    gguf = resolve_gguf(ref, note=note)
    info = check_model_file(gguf)  # refuses files llama.cpp would abort on, before llama-server sees them
    args = load_params(gguf, placement, note=note).cli_args(str(gguf))
    if rpc := rpc_endpoints(args):
        check_workers(rpc)  # llama-server would only log an unreachable worker
    return PlannedModel(gguf=gguf, llama_args=args, has_mtp=info.mtp_layers > 0)
