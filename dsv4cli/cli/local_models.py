"""`dsv4 list` (`ls`), `dsv4 show` and `dsv4 rm`: what is on disk under the dsv4 home, and removing it."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from dsv4cli.cli.options import JsonOpt, ModelArg
from dsv4cli.gguf_io.read import recipe_label
from dsv4cli.ui import err, out, print_json
from dsv4cli.units import human_bytes
from quant.errors import printable


def list_models(json_output: JsonOpt = False) -> None:
    """List every local model: pulled checkpoints and GGUF repos, converted GGUFs, unfinished downloads."""
    from dsv4cli.models.inventory import list_local

    found = list_local()
    if json_output:
        print_json([m.to_dict() for m in found])
        return
    if not found:
        err.print("nothing in the dsv4 home yet; `dsv4 pull NAME` downloads a model")
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("name", "kind", "recipe", "size", "path"):
        table.add_column(column, no_wrap=column != "path", overflow="fold")
    for m in found:
        recipe = recipe_label(m.recipe) if m.recipe else "-"
        kind = m.kind + (f" ({m.state})" if m.state != "complete" else "")
        table.add_row(Text(printable(m.name)), kind, recipe, human_bytes(m.bytes), Text(printable(str(m.path))))
    out.print(table)


def show(model: ModelArg, json_output: JsonOpt = False) -> None:
    """Show a model: architecture, tensor types and bytes per class, files, expert error, chat template, source."""
    from dsv4cli.models.ref import resolve_model
    from dsv4cli.models.show import describe

    info = describe(resolve_model(model))
    if json_output:
        print_json(info)
        return
    _render(info)


def _render(info: dict[str, Any]) -> None:
    recipe = f", {recipe_label(info['recipe'])}" if info["recipe"] else ""
    out.print(printable(f"{info['name']}  ({info['arch']}{recipe}, {human_bytes(info['bytes'])})"), markup=False)
    out.print(printable("  " + ", ".join(f"{k} {v}" for k, v in info["dims"].items())), markup=False)
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("class", "tensors", "bytes", "types"):
        table.add_column(column)
    for name, row in info["classes"].items():
        types = ", ".join(f"{t} {human_bytes(b)}" for t, b in row["types"].items())
        table.add_row(name, str(row["tensors"]), human_bytes(row["bytes"]), types)
    out.print(table)
    for f in info["files"]:
        size = f" ({human_bytes(f['bytes'])})" if f["bytes"] is not None else ""
        out.print(f"  file {printable(f['path'])}{size}", markup=False)
    if info["expert_error_summary"]:
        summary = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info["expert_error_summary"].items()
        )
        out.print(printable(f"  expert error: {summary}"), markup=False)
    if info.get("fit"):
        fitted = info["fit"]
        budget = f"{human_bytes(int(fitted['budget']))}" if fitted["budget"] else "-"
        matrix = fitted["imatrix"] or {}
        where = f"{matrix.get('file')} ({matrix.get('tokens')} tokens of {matrix.get('dataset')})" if matrix else "none"
        out.print(printable(f"  fitted to: {budget}; imatrix: {where}"), markup=False)
        by_recipe: dict[str, list[str]] = {}
        for group, recipe in sorted((fitted["mix"] or {}).items()):
            by_recipe.setdefault(recipe, []).append(group)
        for recipe, groups in sorted(by_recipe.items()):
            out.print(printable(f"    {recipe}: {', '.join(groups)}"), markup=False)
    template = {True: "yes", False: "no", None: "unknown (not downloaded)"}[info["chat_template"]]
    out.print(f"  chat template: {template}", markup=False)
    out.print(printable(f"  converted from: {info['source'] or '-'}; Hub repo: {info['repo'] or '-'}"), markup=False)
    for r in info["eval"]:
        out.print(
            printable(
                f"  eval: KLD {r['kld_mean']:.4g} (median {r['kld_median']:.4g}, 99% {r['kld_p99']:.4g}), "
                f"top-1 {r['top1']:.1%}, PPL {r['ppl']:.4g} vs {r['ppl_ref']:.4g}; against {r['ref']} on "
                f"{r['text']}, ctx {r['ctx']}, {r['tokens']} tokens ({r['date'][:10]})"
            ),
            markup=False,
        )
    if info["fetched_bytes"] is not None:
        err.print(f"read from the Hub: {human_bytes(info['fetched_bytes'])} of headers")


def rm(
    model: ModelArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a local model's files (asks first); refuses files outside the dsv4 home or held by `dsv4 serve`."""
    from dsv4cli.errors import UsageError
    from dsv4cli.models.ref import resolve_model
    from dsv4cli.models.remove import check_removable, find_local_model, remove

    target = find_local_model(resolve_model(model))
    check_removable(target)
    state = f", {target.state}" if target.state != "complete" else ""
    what = printable(f"{target.name} ({target.kind}{state}, {human_bytes(target.bytes)})")
    if not yes:
        if not typer.get_text_stream("stdin").isatty():
            raise UsageError(f"not removing {what} without confirmation", hint="pass --yes")
        files = printable(", ".join(map(str, target.files)), limit=2000)
        if not typer.confirm(f"remove {what}: {files}?", default=False):
            raise typer.Exit(1)
    kept = remove(target, on_wait=lambda message: err.print(printable(message), markup=False))
    err.print(f"removed {what}", markup=False)
    if kept:
        shown = printable(", ".join(kept[:5]) + (", ..." if len(kept) > 5 else ""))
        folder = printable(str(target.folder))
        err.print(f"kept {len(kept)} entries in {folder} that dsv4 did not put there: {shown}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("list")(list_models)
    app.command("ls", hidden=True)(list_models)
    app.command("show")(show)
    app.command("rm")(rm)
