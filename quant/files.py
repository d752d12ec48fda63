"""Opening untrusted checkpoint files safely: regular files only, sizes capped before anything is read.

A config or tokenizer symlinked to /dev/zero would otherwise be read until memory runs out, and a FIFO would
block forever; both are refused here, by the size and type of what was actually opened (fstat of the open
descriptor, so a swap between the check and the read changes nothing). Every JSON file of a checkpoint folder
is read through `load_json`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from quant.errors import CheckpointError, printable

KIB, MIB = 1 << 10, 1 << 20
# Caps well above the largest real file of each kind (DeepSeek V4's tokenizer.json is ~8 MB, its index ~1 MB).
LIMITS = {
    "config.json": MIB,
    "tokenizer.json": 64 * MIB,
    "tokenizer_config.json": 16 * MIB,
    "chat_template.jinja": MIB,
    "model.safetensors.index.json": 64 * MIB,
}
DEFAULT_LIMIT = 16 * MIB
PULL_HINT = "the download is incomplete or damaged; run `dsv4 pull MODEL` to complete it"


def shown(value: object, limit: int = 120) -> str:
    """`value` (a string, else its repr) for a one-line message: `printable`, cut to `limit` characters."""
    return printable(value if isinstance(value, str) else repr(value), limit=limit)


def open_regular(path: Path) -> int:
    """An O_RDONLY descriptor of `path`, which must be a regular file (never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is missing", hint=PULL_HINT) from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})", hint="check the file's permissions") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file", hint="replace it with the real file")
    return fd


def read_bounded(path: Path, limit: int | None = None) -> bytes:
    """The whole content of a regular file of at most `limit` bytes (default: by file name, `LIMITS`)."""
    path = Path(path)
    limit = LIMITS.get(path.name, DEFAULT_LIMIT) if limit is None else limit
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(
                f"{path}: {size} bytes, more than the {limit}-byte limit for this file",
                hint="is this the right file? replace it with the real one",
            )
        data = os.read(fd, limit + 1)  # a file that grows meanwhile is still capped
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})", hint=PULL_HINT) from e
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CheckpointError(f"{path}: grew past the {limit}-byte limit while being read", hint=PULL_HINT)
    return data


def load_json(path: Path, what: str | None = None, *, limit: int | None = None) -> Any:
    """A JSON file, size-capped; missing, oversized, undecodable or too deeply nested ones raise CheckpointError."""
    what = what or Path(path).name
    data = read_bounded(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: {what} is not readable JSON ({reason})", hint=PULL_HINT) from e


def load_json_object(path: Path, what: str | None = None, *, limit: int | None = None) -> dict[str, Any]:
    """`load_json` for files whose top level must be an object (config, index, tokenizer files)."""
    value = load_json(path, what, limit=limit)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what or Path(path).name} is not a JSON object", hint=PULL_HINT)
    return value
