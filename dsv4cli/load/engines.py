"""The engines a prepared model can run on, by the name `dsv4 chat --engine` takes.

* `inprocess`: llama.cpp through llama-cpp-python in this process (`dsv4cli.engine.inprocess`); no RPC workers.
* `server`: a llama-server child of the engine build (`dsv4cli.engine.llama_server`): a GPU build, RPC workers
  and MTP drafting, behind the same `Engine` protocol.

Adding an engine is one module implementing `dsv4cli.engine.Engine` and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dsv4cli.errors import UsageError

if TYPE_CHECKING:
    from dsv4cli.engine.base import Engine
    from dsv4cli.load.prepared import PreparedModel

ENGINES = ("inprocess", "server")
DEFAULT_ENGINE = "inprocess"


def open_engine(
    name: str,
    prepared: PreparedModel,
    *,
    verbose: bool = False,
    engine_bin: Path | None = None,
    mtp: bool = True,
    note: Callable[[str], None],
) -> Engine:
    """Load `prepared` on the engine `name`; `engine_bin` and `mtp` are the server engine's (`dsv4 serve`'s flags)."""
    if name == "inprocess":
        from dsv4cli.engine.inprocess import LlamaEngine

        return LlamaEngine(prepared.gguf, prepared.params, verbose=verbose)
    if name == "server":
        from dsv4cli.engine.llama_server import start_server_engine

        return start_server_engine(prepared, engine_bin=engine_bin, mtp=mtp, note=note)
    raise UsageError(f"--engine {name!r}: choose one of {', '.join(ENGINES)}")
