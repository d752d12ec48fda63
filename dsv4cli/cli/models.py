"""`dsv4 models`: the registry as a table, with what is already local."""

from __future__ import annotations

import typer
from rich import box
from rich.table import Table

from dsv4cli.cli.options import JsonOpt
from dsv4cli.models.local import checkpoint_state, local_ggufs
from dsv4cli.models.registry import load_registry
from dsv4cli.ui import out, print_json
from dsv4cli.units import human_bytes


def models(json_output: JsonOpt = False) -> None:
    """List known models: Hub repo, download size, expert dtype, and what is already on disk."""
    rows = []
    for spec in load_registry().values():
        rows.append(
            {
                "name": spec.name,
                "repo": spec.repo,
                "revision": spec.revision if spec.repo else None,
                "builtin": spec.builtin,
                "download_bytes": spec.download_bytes,
                "expert_dtype": spec.expert_dtype,
                "arch": spec.arch,
                "gguf_repos": list(spec.gguf_repos),
                "description": spec.description,
                "checkpoint": checkpoint_state(spec.local_dir),
                "ggufs": [str(p) for p in local_ggufs(spec)],
            }
        )
    if json_output:
        print_json(rows)
        return
    table = Table(box=box.SIMPLE_HEAD)
    widths = {"name": max(len(r["name"]) for r in rows), "size": 10, "experts": 7, "arch": 10, "local": 8}
    for column in ("name", "size", "experts", "arch", "local", "repo"):
        table.add_column(column, no_wrap=True, overflow="ellipsis", min_width=widths.get(column))
    for row in rows:
        size = human_bytes(row["download_bytes"]) if row["download_bytes"] else "built in"
        local = ", ".join(filter(None, [row["checkpoint"], f"{len(row['ggufs'])} gguf" if row["ggufs"] else None]))
        table.add_row(row["name"], size, row["expert_dtype"], row["arch"], local or "-", row["repo"] or "-")
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
