"""Typed errors that `dsv4` turns into one-line messages (see `cli.main`).

Each class also subclasses the closest builtin so library callers can catch it naturally.
"""

from __future__ import annotations


class Dsv4Error(Exception):
    """An error meant for the user: the message names the file, tensor or flag; `hint` says what to do."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(Dsv4Error, ValueError):
    """A flag or argument value that cannot work."""


class UnknownModelError(Dsv4Error, KeyError):
    """A model name that is neither in the registry nor a Hub repo id or local path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RegistryError(Dsv4Error, ValueError):
    """A malformed models.toml entry."""


class DownloadError(Dsv4Error, OSError):
    """A download that could not complete; partial files are kept for resume."""


class AuthError(DownloadError):
    """401/403 from the Hub: token missing, wrong, or licence not accepted."""


class NotFoundOnHubError(DownloadError):
    """Repo, revision or file does not exist on the Hub."""


class DiskSpaceError(Dsv4Error, OSError):
    """Not enough free disk for what remains to be written."""


class IntegrityError(DownloadError):
    """A file on disk does not match the Hub's size or sha256."""


class PlanError(Dsv4Error, ValueError):
    """A placement that cannot be made (does not fit, bad budget, wrong file)."""


class RuntimeLoadError(Dsv4Error, RuntimeError):
    """A GGUF that the bundled llama.cpp cannot or should not load."""


class UnsafePathError(Dsv4Error, ValueError):
    """A file name from untrusted input (a Hub listing, a manifest, a registry entry) that is not a safe
    relative path, or a symlink planted where dsv4 writes."""
