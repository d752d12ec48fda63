"""The `dsv4` command line: the typer app, command registration and the one error path.

Each command lives in its own module here and only parses and prints; the work is in `dsv4cli/*.py`
and `quant/`. Errors are raised as typed exceptions and turned into one line by `main()`.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import typer

from dsv4cli import __version__
from dsv4cli.errors import Dsv4Error
from quant.errors import QuantError

app = typer.Typer(
    name="dsv4",
    help="Run DeepSeek V4-family MoE models on one consumer GPU plus host RAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)

# One module per command; each defines `register(app)`. Only commands that work are listed.
COMMAND_MODULES = ("models", "pull", "quantize", "plan", "chat", "serve", "engine")


def _version(value: bool) -> None:
    if value:
        print(f"dsv4 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Run DeepSeek V4-family MoE models on one consumer GPU plus host RAM."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"dsv4cli.cli.{_name}").register(app)


def format_error(exc: BaseException) -> str | None:
    """The one-line message for an error we expect, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, (Dsv4Error, QuantError)):
        hint = getattr(exc, "hint", None)
        return f"{exc}" + (f" ({hint})" if hint else "")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"disk full{where}; free some space and run the command again (completed work is kept)"
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `dsv4` script."""
    command = typer.main.get_command(app)
    try:
        # Outside standalone mode typer returns (not raises) the code of a `typer.Exit`, and Ctrl-C as 130.
        code = command.main(args=argv, prog_name="dsv4", standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # usage errors: shown the way typer shows them
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:
        message = format_error(e)
        if message is None or os.environ.get("DSV4_DEBUG"):
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
