"""`dsv4 rm`: remove one model, and nothing else.

MODEL resolves to exactly one model `dsv4 list` shows (a name, or a path to one of its files or its folder). A
path is placed before anything is listed or walked: the home itself, a folder holding it (`/`), the state folders
directly under it (`models/`, `gguf/`, `run/`, `logs/`, ...), anything outside it and a symlink are refused with
one line. Only the files the model's own manifest lists inside its folder are deleted (names checked by
`read_manifest`, each unlinked without following a symlink), then dsv4's own state for it; a folder is removed
only once nothing but dsv4's state is left, so a user's own files stay. A file a live `dsv4 serve` holds is
refused; a pulled model is removed under its pull lock (a complete one waits for a running pull; a download in
progress is refused at once, so the pull is never pulled out from under).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from dsv4cli.errors import UsageError
from dsv4cli.home import dsv4_home, gguf_dir
from dsv4cli.hub import safe_paths
from dsv4cli.hub.manifest import PARTIAL_DIR, forget_files
from dsv4cli.models.inventory import LocalModel, list_local
from dsv4cli.models.local import LOCK_NAME, MANIFEST_NAME, STATE_PREFIX
from dsv4cli.models.ref import ModelRef
from dsv4cli.server.records import running_servers
from quant.errors import printable

LIST_HINT = "`dsv4 list` shows the models dsv4 rm can remove"


def _refuse(path: Path, why: str, hint: str = LIST_HINT) -> UsageError:
    return UsageError(f"refusing to remove {printable(str(path))}: {why}", hint=hint)


def _placed(path: Path) -> Path:
    """Where `path` is, as an absolute path whose folders are resolved (the last component is not followed), or
    UsageError when it is not somewhere a model can be."""
    home = dsv4_home().resolve()
    here = path.parent.resolve() / path.name if path.name not in ("", ".", "..") else path.resolve()
    if here == home or here in home.parents:
        raise _refuse(path, "it is the dsv4 home or holds it")
    if home not in here.parents or home not in path.resolve().parents:
        raise _refuse(
            path,
            f"it is outside the dsv4 home ({home})",
            "dsv4 rm removes only what dsv4 put in its home; delete other files yourself",
        )
    if here.parent == home:
        raise _refuse(path, "it is one of dsv4's state folders, not a model")
    if path.is_symlink():
        raise _refuse(path, "it is a symlink, not a model dsv4 wrote")
    return here


def find_local_model(ref: ModelRef) -> LocalModel:
    """The one local model MODEL names (a name `dsv4 list` shows, a path to it, or a registry/Hub name with `:TAG`)."""
    raw = ref.path if ref.kind == "gguf" else Path(ref.text).expanduser()
    is_path = ref.kind in ("gguf", "checkpoint") and raw is not None and (raw.exists() or raw.is_symlink())
    here = _placed(raw) if is_path and raw is not None else None
    entries = list_local()
    by_name = [e for e in entries if e.name == ref.text]
    if here is not None:
        by_name = [e for e in entries if here == e.path or (e.kind != "checkpoint" and here in e.files)] or [
            e for e in entries if here == e.folder and e.kind != "gguf-repo"
        ]
        if not by_name:
            owner = next((e for e in entries if e.folder is not None and e.folder in here.parents), None)
            whose = f"it is inside the folder of {printable(owner.name)}, but not that model" if owner else ""
            raise _refuse(raw, whose or "it is not a model dsv4 list shows")
    elif not by_name and ref.kind in ("registry", "hub") and ref.spec is not None:
        from dsv4cli.load.resolve import find_local_gguf

        pulled = find_local_gguf(ref) if ref.tag or ref.kind == "hub" else None
        folder = ref.spec.local_dir
        whole_folder = not (ref.tag or ref.file)
        by_name = [e for e in entries if pulled and e.path == pulled] or [
            e for e in entries if whole_folder and e.folder == folder and e.kind != "gguf-repo"
        ]
    if len(by_name) != 1:
        names = ", ".join(printable(e.name) for e in by_name)
        raise UsageError(
            f"{printable(ref.text)}: " + (f"names {len(by_name)} models ({names})" if by_name else "no such model"),
            hint="name one of them" if by_name else LIST_HINT,
        )
    return by_name[0]


def check_removable(model: LocalModel) -> None:
    """Refuse a damaged or unreadable model, or one whose files a live `dsv4 serve` holds."""
    if model.state in ("damaged", "unreadable"):
        raise _refuse(
            model.path,
            f"it is {model.state}, so dsv4 cannot tell which files are the model's",
            "look at the folder and delete it yourself, or `dsv4 pull` the model again to repair it",
        )
    held = {p.parent.resolve() / p.name for p in model.files}
    for server in running_servers():
        for f in server["files"]:
            real = Path(f)
            if real in held or any(h in real.parents for h in held):
                pid = server["pid"]
                raise UsageError(
                    f"{printable(model.name)} is in use by dsv4 serve (pid {pid}, {printable(str(server.get('url')))})",
                    hint=f"stop that server first (kill {pid})",
                )


def remove(model: LocalModel, *, on_wait: Callable[[str], None]) -> list[str]:
    """Delete the model's files; returns the names of entries left in its folder that are not the model's."""
    check_removable(model)
    if model.folder is None:  # quantize's outputs, directly in $DSV4_HOME/gguf
        for path in model.files:
            safe_paths.unlink(gguf_dir(), path.name)
        return []
    folder = model.folder
    with _locked(folder, wait=model.state == "complete", on_wait=on_wait):
        check_removable(model)  # a server may have started while we waited
        rels = [p.relative_to(folder).as_posix() for p in model.files]
        if model.kind == "gguf-repo" and model.state == "complete":
            forget_files(folder, rels)
        for rel in rels:
            if rel == PARTIAL_DIR:
                _remove_tree(folder, rel)
            else:
                safe_paths.unlink(folder, rel)
        if model.kind == "checkpoint":
            safe_paths.unlink(folder, MANIFEST_NAME)
            _remove_tree(folder, PARTIAL_DIR)
        _prune_empty(folder)
        left = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
    if not left:
        safe_paths.unlink(folder, LOCK_NAME)
        with contextlib.suppress(OSError):
            folder.rmdir()
    return [name for name in left if not name.startswith(STATE_PREFIX)]


@contextlib.contextmanager
def _locked(folder: Path, *, wait: bool, on_wait: Callable[[str], None]) -> Iterator[None]:
    """The folder's pull lock; a download in progress (`wait` False) is refused instead of waited for."""

    def busy(message: str) -> None:
        if not wait:
            raise UsageError(
                f"refusing to remove {printable(str(folder))}: a `dsv4 pull` is downloading into it now",
                hint="stop that pull first, or let it finish and remove the model then",
            )
        on_wait(message)

    with safe_paths.folder_lock(folder, LOCK_NAME, what="`dsv4 pull`", on_wait=busy):
        yield


def _remove_tree(folder: Path, rel: str) -> None:
    """Remove folder/rel, a folder of dsv4's own, if it is a real folder (a symlink there is only unlinked)."""
    path = folder / rel
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)  # never follows a symlink inside (fd-based on Linux)


def _prune_empty(folder: Path) -> None:
    """Remove the empty sub-folders the deleted files leave behind, deepest first (never following a link)."""
    for root, dirs, _ in os.walk(folder, topdown=False):
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(Path(root) / d)
