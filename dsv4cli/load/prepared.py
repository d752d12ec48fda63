"""`prepare_model`: the one loading path of `dsv4 chat`, `dsv4 serve` and `dsv4 eval`, up to the engine.

MODEL resolves to a local GGUF (`resolve`), its header is read and checked once (`model_file`), and the
placement becomes `LoadParams` (a plan file checked against that header, or a plan made now from it). Every
engine starts from the `PreparedModel`: the in-process one loads `params`, llama-server is given
`llama_args`, and chat renders prompts with `renderer`. Nothing here imports llama_cpp or the chat REPL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from dsv4cli.engine.params import LoadParams
from dsv4cli.load.model_file import ModelFile, open_model_file
from dsv4cli.load.placement import Placement
from dsv4cli.load.resolve import resolve_gguf
from dsv4cli.models.ref import ModelRef, file_ref
from dsv4cli.rpc.protocol import Endpoint, parse_endpoints

if TYPE_CHECKING:
    from dsv4cli.chat.prompt import PromptRenderer


@dataclass(frozen=True)
class PreparedModel:
    """A checked GGUF and how to load it: everything an engine needs, read once."""

    model_file: ModelFile
    params: LoadParams

    @property
    def gguf(self) -> Path:
        return self.model_file.path

    @property
    def has_mtp(self) -> bool:
        return self.model_file.has_mtp

    @property
    def llama_args(self) -> list[str]:
        """llama-server flags from the plan, `-m` the file being loaded (even where a plan file names another)."""
        return self.params.cli_args(self.gguf)

    @property
    def workers(self) -> tuple[Endpoint, ...]:
        """The RPC workers the placement uses, typed (the load parameters keep llama.cpp's `HOST:PORT`)."""
        return parse_endpoints(",".join(self.params.rpc)) if self.params.rpc else ()

    @cached_property
    def renderer(self) -> PromptRenderer:
        """The prompt renderer (built on first use: the template compiles in its own sandboxed process, which
        `serve` never needs)."""
        return prompt_renderer(self.model_file)


def prompt_renderer(model: ModelFile | Path) -> PromptRenderer:
    """The renderer of the GGUF's chat template with its special tokens (a path is read and checked first)."""
    from dsv4cli.chat.prompt import PromptRenderer

    model_file = open_model_file(model) if isinstance(model, Path) else model
    info = model_file.info
    return PromptRenderer(
        info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token, source=str(model_file.path)
    )


def load_params(
    model: ModelFile | Path, placement: Placement, *, note: Callable[[str], None] | None = None
) -> LoadParams:
    """The load parameters from a plan file (checked against this header; `note` hears of values adapted to
    this machine), or from a plan made now from this header for the given budgets (a path is opened first)."""
    from dsv4cli.plan import make_plan
    from dsv4cli.plan.schema import load_plan_params

    model_file = open_model_file(model) if isinstance(model, Path) else model

    if placement.plan_file:
        return load_plan_params(placement.plan_file, model_file.source, note=note)
    return make_plan(model_file.source, placement.plan_inputs()).load_params()


def prepare_model(ref: ModelRef | Path | None, placement: Placement, *, note: Callable[[str], None]) -> PreparedModel:
    """Resolve MODEL (None: the built-in tiny model), read and check its header once, and place it.

    Raises RuntimeLoadError for a file llama.cpp would abort on, before any engine sees it, and the plan's
    errors for a placement that does not fit or a plan file made for another model.
    """
    gguf = resolve_gguf(file_ref(ref) if isinstance(ref, Path) else ref, note=note)
    model_file = open_model_file(gguf)
    return PreparedModel(model_file=model_file, params=load_params(model_file, placement, note=note))
