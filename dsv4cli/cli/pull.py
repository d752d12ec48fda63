"""`dsv4 pull`: download (or write, for built-in models) a checkpoint, verified."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Placeholder until the command lands; keeps the app importable."""
