"""Option types shared by several commands, so the same flag reads the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

ModelArg = Annotated[str, typer.Argument(help="Registry name (see `dsv4 models`), Hub repo id `org/name`, or a path.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
