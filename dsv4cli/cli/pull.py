"""`dsv4 pull`: download (or write, for built-in models) a checkpoint, verified and resumable."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dsv4cli.cli.options import JsonOpt, ModelArg
from dsv4cli.ui import byte_progress, err, out, print_json
from dsv4cli.units import human_bytes

if TYPE_CHECKING:
    from dsv4cli.hub.pull import PullResult

PULL_EXAMPLES = """\b
Examples:
  dsv4 pull tiny                                   # built-in test model, written offline
  dsv4 pull deepseek-v4-flash --dry-run            # what is left to download, and free disk
  dsv4 pull deepseek-v4-flash --include '*.json'   # only some files
  dsv4 pull deepseek-v4-flash --verify             # re-hash what is on disk, download nothing
  dsv4 pull unsloth/DeepSeek-V4-Flash-GGUF:UD-Q2_K_XL   # one quant of a GGUF repo (all its shards)
  dsv4 pull deepseek-v4-flash:ud-q2_k_xl           # the same, through the registry's gguf_repos
"""


class RichPullProgress:
    """One overall bar plus one bar per file in flight (rich is thread-safe; workers call this)."""

    def __init__(self) -> None:
        self.display = byte_progress()
        self.overall: int | None = None
        self.tasks: dict[str, int] = {}
        self.lock = threading.Lock()

    def start(self, total_bytes: int) -> None:
        self.overall = self.display.add_task("total", total=total_bytes)

    def file_started(self, path: str, size: int, *, action: str) -> None:
        with self.lock:
            if path in self.tasks:
                self.display.remove_task(self.tasks.pop(path))
            self.tasks[path] = self.display.add_task(f"{action} {path}", total=size)

    def advance(self, path: str, delta: int) -> None:
        task = self.tasks.get(path)
        if task is not None:
            self.display.advance(task, delta)
        if self.overall is not None:
            self.display.advance(self.overall, delta)

    def file_done(self, path: str) -> None:
        with self.lock:
            task = self.tasks.pop(path, None)
        if task is not None:
            self.display.remove_task(task)

    def note(self, message: str) -> None:
        self.display.console.print(f"warning: {message}")


def pull(
    model: ModelArg,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit (default: the registry's pin).")] = None,
    include: Annotated[list[str] | None, typer.Option(help="Only files matching this glob (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Skip files matching this glob (repeatable).")] = None,
    dir: Annotated[Path | None, typer.Option("--dir", help="Target folder (default: $DSV4_HOME/models/NAME).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show files, sizes, free disk; change nothing.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-hash what is on disk against the Hub; download nothing.")
    ] = False,
    workers: Annotated[int, typer.Option(help="Files downloaded in parallel.")] = 4,
    json_output: JsonOpt = False,
) -> None:
    """Download a model checkpoint or a GGUF repo's quant (`REPO:TAG`), checking every file's sha256."""
    from dsv4cli.errors import IntegrityError, UsageError
    from dsv4cli.hub.pull import PullOptions
    from dsv4cli.hub.pull import pull as run_pull

    if dry_run and verify:
        raise UsageError("--dry-run and --verify cannot be combined")
    options = PullOptions(
        revision=revision,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        folder=dir,
        workers=workers,
        dry_run=dry_run,
        verify=verify,
    )
    progress = RichPullProgress()
    with progress.display:
        result = run_pull(model, options, progress=progress)
    if json_output:
        print_json(result.to_dict())
    else:
        _print_result(result)
    if result.mismatched:
        raise IntegrityError(
            f"{len(result.mismatched)} file(s) in {result.folder} do not match the Hub: {', '.join(result.mismatched)}",
            hint=f"run `dsv4 pull {result.model}` to fetch them again",
        )


def _print_result(result: PullResult) -> None:
    where = f"{result.repo or result.model}@{result.revision[:12]} -> {result.folder}"
    if result.mode == "dry-run":
        for f in result.files:
            out.print(f"{f.status:>9}  {human_bytes(f.size):>11}  {f.path}")
        out.print(
            f"{where}\n{len(result.files)} files, {human_bytes(result.total_bytes)} total, "
            f"{human_bytes(result.remaining_bytes)} left to {'write' if result.builtin else 'download'}, "
            f"{human_bytes(result.free_bytes)} free"
        )
        return
    if result.mode == "verify":
        out.print(f"{where}\nverified {result.verified} of {len(result.files)} files")
        return
    if result.builtin:
        out.print(f"{where}\nbuilt-in checkpoint: {len(result.files)} files, {result.verified} verified")
        return
    rate = result.downloaded_bytes / result.seconds if result.seconds else 0.0
    out.print(
        f"{where}\n{len(result.files)} files ({human_bytes(result.total_bytes)}), "
        f"downloaded {human_bytes(result.downloaded_bytes)} in {result.seconds:.1f}s "
        f"({human_bytes(rate)}/s), {result.verified} verified"
        + (f", fetched again: {', '.join(result.refetched)}" if result.refetched else "")
    )
    if result.refetched:
        err.print(f"note: {len(result.refetched)} file(s) failed the hash check once and were fetched again")


def register(app: typer.Typer) -> None:
    app.command("pull", epilog=PULL_EXAMPLES)(pull)
