"""The `dsv4` command line: the typer app, command registration and the one error path.

Each command lives in its own module here and only parses and prints; the work is in the rest of `dsv4cli`
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
from quant.errors import QuantError, printable

app = typer.Typer(
    name="dsv4",
    help="Run DeepSeek V4-family MoE models on one consumer GPU plus host RAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One module per command; each defines `register(app)`. Only commands that work are listed.
COMMAND_MODULES = (
    "models",
    "local_models",
    "pull",
    "quantize",
    "imatrix",
    "plan",
    "tune",
    "chat",
    "serve",
    "eval",
    "worker",
    "engine",
    "doctor",
)


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


# OS errors any command can meet while writing: what happened, and what to do about it.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space and run the command again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and run the command again"),
    errno.EROFS: ("read-only file system", "choose a writable location (--dir, -o) or remount it read-write"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another location (--dir, -o)"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another location (--dir, -o)"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.ENOTDIR: ("a part of the path is not a folder", "choose another location (--dir, -o)"),
    errno.EISDIR: ("a folder is where a file should be", "choose another path or move the folder"),
    errno.ELOOP: ("too many levels of symlinks", "fix the symlinks in the path"),
    errno.EEXIST: ("something else already exists there", "move it away or choose another location ($DSV4_HOME, -o)"),
}


def format_error(exc: BaseException) -> str | None:
    """The one-line message for an error we expect, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, (Dsv4Error, QuantError)):
        hint = getattr(exc, "hint", None)
        return printable(f"{exc}" + (f" ({hint})" if hint else ""))
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
        what, todo = _OS_ERRORS[exc.errno]
        names = [printable(n) for n in (exc.filename, exc.filename2) if n is not None]
        return f"{what}: {' -> '.join(names) or 'the system did not name the file'}; {todo}"
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
