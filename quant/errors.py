"""Errors raised by `quant/`; the CLI prints them as one line (it never imports the other way round). And how
any text from a stranger is put into such a line, or onto the terminal (`printable`), for both packages."""

from __future__ import annotations

import os
import unicodedata

_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}  # controls (ESC, CSI, BEL), bidi overrides, line separators


class QuantError(Exception):
    """A problem with the input checkpoint or the requested output; the message names file and tensor."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class CheckpointError(QuantError, ValueError):
    """A missing, truncated or malformed checkpoint file, header or tensor."""


class UnsupportedError(QuantError, ValueError):
    """An architecture, dtype or recipe this converter does not handle."""


class OutputError(QuantError, OSError):
    """An output that cannot be written (full disk, read-only folder, another run holding it) or a GGUF split set
    that is incomplete or mixed."""


def printable(text: object, *, keep: str = "", limit: int | None = None) -> str:
    """`text` from a stranger (a file name, host, model name, server error, model output) made safe for a
    terminal: every control or format character (ESC of an escape sequence, CSI, BEL, bidi overrides) is shown
    escaped (`\\x1b`), except those in `keep` (the REPL keeps "\\n\\t"); cut to `limit` characters."""
    value = os.fsdecode(text) if isinstance(text, (str, bytes, os.PathLike)) else str(text)
    if limit is not None and len(value) > limit:
        value = value[: max(limit - 3, 0)] + "..."
    if value.isprintable():
        return value
    return "".join(
        c.encode("unicode_escape").decode("ascii") if c not in keep and unicodedata.category(c) in _UNPRINTABLE else c
        for c in value
    )
