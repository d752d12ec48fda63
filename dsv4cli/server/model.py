"""The one place `dsv4 serve` reaches into the model reference and the planner (shared with `dsv4 chat`).

Serve resolves and places a model exactly as chat does, then hands llama-server the plan's own command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.chat import Placement, resolve_gguf
from dsv4cli.gguf_check import check_gguf
from dsv4cli.model_ref import resolve_model
from dsv4cli.plan import load_plan, make_plan
from dsv4cli.plan.source import read_gguf
from dsv4cli.rpc.health import check_workers, rpc_endpoints


@dataclass(frozen=True)
class PlannedModel:
    gguf: Path
    llama_args: list[str]  # llama-server flags from the plan, `-m` included
    chat_template: str | None  # the GGUF's own template
    has_mtp: bool  # the nextn (multi-token prediction) block is in the file


def plan_model(model: str, placement: Placement, *, note: Callable[[str], None]) -> PlannedModel:
    """Resolve MODEL to a checked GGUF and the llama-server flags of its plan (`--plan FILE` or one made now)."""
    gguf = resolve_gguf(resolve_model(model), note=note)
    template = check_gguf(gguf).chat_template  # also refuses files llama.cpp would abort on
    source = read_gguf(gguf)
    # llama.cpp drafts only when the block's first tensor is there (src/models/deepseek4.cpp probes for it)
    mtp = any(t.name.endswith(".nextn.eh_proj.weight") for t in source.tensors)
    if placement.plan_file:
        plan = load_plan(placement.plan_file)
    else:
        plan = make_plan(source, placement.plan_inputs()).to_dict()
    args = _with_model(list(plan["llama_args"]), gguf)
    if rpc := rpc_endpoints(args):
        check_workers(rpc)  # llama-server would only log an unreachable worker
    return PlannedModel(gguf=gguf, llama_args=args, chat_template=template, has_mtp=mtp)


def _with_model(args: list[str], gguf: Path) -> list[str]:
    """The plan's flags with `-m` pointing at the file being served (a plan file may name another path).

    The pinned llama-server has no `--no-mmap` any more (common/arg.cpp: `--load-mode none`); `Plan.llama_args`
    still prints the old spelling, so it is translated here until the plan says it itself.
    """
    if "-m" in args:
        i = args.index("-m")
        del args[i : i + 2]
    args = [part for arg in args for part in (["--load-mode", "none"] if arg == "--no-mmap" else [arg])]
    return ["-m", str(gguf), *args]
