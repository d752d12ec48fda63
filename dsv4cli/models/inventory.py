"""What is on disk under the dsv4 home, model by model (`dsv4 list`); `dsv4cli.models.remove` deletes one.

Kinds: "checkpoint" (a pulled official checkpoint folder), "gguf-repo" (a pre-quantized GGUF pulled from a Hub
repo, one entry per quant), "gguf" (written by `dsv4 quantize` into `$DSV4_HOME/gguf`), "download" (a folder a
pull has not finished). States: "complete", "partial" (a pull has not finished), "damaged" (a manifest that
cannot be read or names unsafe paths), "unreadable" (the folder cannot be read). A damaged home is listed, never
a crash. Names are what chat/plan/show/rm accept for the same model. `files` are exactly what removing the model
deletes: the files its own manifest lists inside its folder (or dsv4's partial folder, or quantize's outputs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4cli.errors import IntegrityError
from dsv4cli.gguf_io.read import read_recipe
from dsv4cli.home import gguf_dir, models_dir
from dsv4cli.hub import gguf_repo
from dsv4cli.hub.pull import PARTIAL_DIR, read_manifest
from dsv4cli.models.local import MANIFEST_NAME

REPORT_SUFFIX = ".report.json"  # `dsv4 quantize` writes FILE.gguf.report.json beside its output


@dataclass
class LocalModel:
    name: str  # what chat/plan/show/rm accept
    kind: str  # checkpoint | gguf-repo | gguf | download
    state: str  # complete | partial | damaged | unreadable
    path: Path  # the folder (checkpoint, partial download) or the first shard
    files: tuple[Path, ...] = ()  # what removing it deletes (the partial folder is deleted whole)
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
    """The models in one pulled folder; a folder that cannot be read is one "unreadable" entry."""
    try:
        return _pulled_models(folder)
    except OSError:
        return [LocalModel(_name_of(folder), "download", "unreadable", folder, folder=folder)]


def _pulled_models(folder: Path) -> list[LocalModel]:
    base = _name_of(folder)
    manifest = read_manifest(folder)
    names = list(manifest.get("files", {}))
    if not manifest:
        partial = folder / PARTIAL_DIR
        if (folder / MANIFEST_NAME).exists() or (folder / MANIFEST_NAME).is_symlink():
            return [LocalModel(base, "download", "damaged", folder, (), _size(folder), folder=folder)]
        files = (partial,) if partial.is_dir() and not partial.is_symlink() else ()
        return [LocalModel(base, "download", "partial", folder, files, _size(folder), folder=folder)]
    if not gguf_repo.is_gguf_repo(names):
        repo = manifest.get("repo")
        files = tuple(folder / n for n in names)
        return [LocalModel(base, "checkpoint", "complete", folder, files, _size(folder), repo=repo, folder=folder)]
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
