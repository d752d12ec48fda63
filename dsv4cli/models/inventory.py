"""What is on disk under the dsv4 home, model by model (`dsv4 list`), and removing one (`dsv4 rm`).

Kinds: "checkpoint" (a pulled official checkpoint folder), "gguf-repo" (a pre-quantized GGUF pulled from a Hub
repo, one entry per quant), "gguf" (written by `dsv4 quantize` into `$DSV4_HOME/gguf`). A folder a pull has not
finished is listed with state "partial". Names are what chat/plan/show/rm accept for the same model.

Removal never leaves the home: every path is resolved (a symlink is removed itself, never what it points to,
and one pointing out of the home is refused), a file a running `dsv4 serve` holds is refused, and a pulled
folder is removed under its pull lock, so a running pull finishes (or is waited for) first.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4cli.errors import IntegrityError, UsageError
from dsv4cli.gguf_io.read import read_recipe
from dsv4cli.home import dsv4_home, gguf_dir, models_dir
from dsv4cli.hub import gguf_repo, safe_paths
from dsv4cli.hub.manifest import PARTIAL_DIR, forget_files, read_manifest
from dsv4cli.models.local import LOCK_NAME
from dsv4cli.models.ref import ModelRef
from dsv4cli.server.records import running_servers

REPORT_SUFFIX = ".report.json"  # `dsv4 quantize` writes FILE.gguf.report.json beside its output


@dataclass
class LocalModel:
    name: str  # what chat/plan/show/rm accept
    kind: str  # checkpoint | gguf-repo | gguf
    state: str  # complete | partial
    path: Path  # the folder (checkpoint, partial download) or the first shard
    files: tuple[Path, ...] = ()  # what removing it deletes (a folder is deleted whole)
    bytes: int = 0
    recipe: dict[str, str] | None = None
    repo: str | None = None
    folder: Path | None = field(default=None, repr=False)  # the pulled folder it belongs to (lock, manifest)

    def to_dict(self) -> dict[str, Any]:
        from dsv4cli.eval.record import read_results

        keys = ("name", "kind", "state", "bytes", "recipe", "repo")
        measured = read_results(self.path) if self.kind in ("gguf", "gguf-repo") and self.state == "complete" else []
        return {k: getattr(self, k) for k in keys} | {
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "eval": measured,  # `dsv4 eval` results, newest first
        }


def _size(path: Path) -> int:
    """Bytes on disk below `path` (or of it), never following a symlink."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        total += sum((Path(root) / f).lstat().st_size for f in files)
    return total


def _name_of(folder: Path) -> str:
    """The model name a pulled folder stands for: its registry name, or the Hub id of an ad-hoc pull."""
    return folder.name.replace("--", "/", 1) if "--" in folder.name else folder.name


def _pulled(folder: Path) -> list[LocalModel]:
    base = _name_of(folder)
    manifest = read_manifest(folder)
    names = list(manifest.get("files", {}))
    if not manifest:
        return [LocalModel(base, "download", "partial", folder, (folder,), _size(folder), folder=folder)]
    if not gguf_repo.is_gguf_repo(names):
        repo = manifest.get("repo")
        return [LocalModel(base, "checkpoint", "complete", folder, (folder,), _size(folder), repo=repo, folder=folder)]
    found = []
    for first in gguf_repo.first_shards(names):
        try:
            shards = [folder / p for p in gguf_repo.shard_set(names, first, repo=base)]
        except IntegrityError:  # only some shards were pulled (`--include`): not a model to run
            continue
        tag = gguf_repo.tag_of(first, names)
        name = f"{base}:{tag}" if tag else f"{base}/{first}"
        size = sum(_size(p) for p in shards if p.exists())
        recipe = read_recipe(shards[0])
        found.append(LocalModel(name, "gguf-repo", "complete", shards[0], tuple(shards), size, recipe, base, folder))
    partial = folder / PARTIAL_DIR
    if partial.is_dir() and not partial.is_symlink():
        found.append(LocalModel(base, "gguf-repo", "partial", partial, (partial,), _size(partial), folder=folder))
    return found


def _converted(path: Path) -> LocalModel:
    names = sorted(p.name for p in path.parent.glob("*.gguf"))
    try:
        shards = [path.parent / n for n in gguf_repo.shard_set(names, path.name, repo=str(path.parent))]
    except IntegrityError:  # a shard is missing: list what is there, so it can be removed
        shards = [path.parent / n for n in names if gguf_repo.set_name(n) == gguf_repo.set_name(path.name)]
    from dsv4cli.eval.record import record_path

    extras = (path.parent / (gguf_repo.set_name(path.name) + REPORT_SUFFIX), record_path(path))
    files = tuple(shards) + tuple(f for f in extras if f.is_file())
    return LocalModel(path.name, "gguf", "complete", path, files, sum(_size(f) for f in shards), read_recipe(path))


def list_local() -> list[LocalModel]:
    """Every model under the dsv4 home, pulled folders first, in name order."""
    found: list[LocalModel] = []
    if models_dir().is_dir():
        for folder in sorted(models_dir().iterdir()):
            if folder.is_dir() and not folder.is_symlink():
                found += _pulled(folder)
    if gguf_dir().is_dir():
        firsts = gguf_repo.first_shards(p.name for p in gguf_dir().iterdir())
        found += [_converted(gguf_dir() / name) for name in firsts if not (gguf_dir() / name).is_symlink()]
    return found


def find_local_model(ref: ModelRef) -> LocalModel:
    """The local model MODEL names (a name `dsv4 list` shows, a path, or a registry/Hub name with `:TAG`)."""
    entries = list_local()
    by_name = next((e for e in entries if e.name == ref.text), None)
    if by_name:
        return by_name
    if ref.kind in ("gguf", "checkpoint"):
        path = ref.path
        wanted = path.resolve()
        match = next((e for e in entries if wanted in {e.path.resolve(), *(f.resolve() for f in e.files)}), None)
        if match is None and (path.exists() or path.is_symlink()):  # not dsv4's: check_removable says where it is
            match = LocalModel(path.name, ref.kind, "complete", path, (path,), _size(path))
    else:
        from dsv4cli.load.resolve import find_local_gguf

        pulled = find_local_gguf(ref) if ref.tag or ref.kind == "hub" else None
        folder = ref.spec.local_dir
        whole_folder = not (ref.tag or ref.file)
        match = next((e for e in entries if pulled and e.path == pulled), None) or next(
            (e for e in entries if whole_folder and e.folder == folder and e.kind != "gguf-repo"), None
        )
    if match is None:
        raise UsageError(f"{ref.text}: no such model in the dsv4 home", hint="`dsv4 list` shows what is there")
    return match


def check_removable(model: LocalModel) -> None:
    """Refuse a model outside the home (after resolving symlinks) or one a running `dsv4 serve` holds."""
    home = dsv4_home().resolve()
    for path in model.files:
        real = path.parent.resolve() / path.name
        if home not in real.parents or (path.is_symlink() and home not in path.resolve().parents):
            raise UsageError(
                f"refusing to remove {path}: it is outside the dsv4 home ({home})",
                hint="dsv4 rm removes only what dsv4 put in its home; delete other files yourself",
            )
    held = {p.resolve() for p in model.files}
    for server in running_servers():
        for f in server["files"]:
            real = Path(f).resolve()
            if real in held or any(h in real.parents for h in held):
                pid = server["pid"]
                raise UsageError(
                    f"{model.name} is in use by dsv4 serve (pid {pid}, {server.get('url')})",
                    hint=f"stop that server first (kill {pid})",
                )


def remove(model: LocalModel, *, on_wait: Callable[[str], None]) -> None:
    """Delete the model's files (a folder whole); a pulled quant is also dropped from its folder's manifest."""
    check_removable(model)
    if model.folder is None:
        for path in model.files:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return
    folder = model.folder
    with safe_paths.folder_lock(folder, LOCK_NAME, what="`dsv4 pull`", on_wait=on_wait):
        check_removable(model)  # a server may have started while we waited
        if model.kind == "gguf-repo" and model.state == "complete":
            forget_files(folder, [p.relative_to(folder).as_posix() for p in model.files])
            for path in model.files:
                safe_paths.unlink(folder, path.relative_to(folder).as_posix())
        else:
            target = model.files[0]
            if target == folder:
                shutil.rmtree(folder)
                return
            shutil.rmtree(target)
    if not read_manifest(folder) and not (folder / PARTIAL_DIR).exists():
        shutil.rmtree(folder, ignore_errors=True)
