"""Errors raised by `quant/`; the CLI prints them as one line (it never imports the other way round)."""

from __future__ import annotations


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
