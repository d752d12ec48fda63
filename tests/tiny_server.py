"""The tiny model on llama-server for the serve tests: one way to start it, shared by every module-scoped fixture."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsv4cli.models.ref import resolve_model


@contextlib.contextmanager
def tiny_server(engine: Any, gguf: Path, home: Path, **options: Any) -> Iterator[Any]:
    """`dsv4 serve`'s start_server on `gguf` (a free port, context 4096, DSV4_HOME=`home`), stopped on exit.

    `options` are ServeOptions fields (api_key, alias, think, ...)."""
    from dsv4cli.load.placement import Placement
    from dsv4cli.server.launch import ServeOptions, start_server

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSV4_HOME", str(home))
        opts = ServeOptions(port=0, health_timeout=120, **options)
        running = start_server(resolve_model(str(gguf)), Placement(ctx=4096), opts, engine, note=lambda _: None)
        try:
            yield running
        finally:
            running.stop()
