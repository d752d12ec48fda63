"""What is already on disk for a model: its pulled checkpoint folder and its quantized GGUFs.

`dsv4 pull` writes MANIFEST_NAME into a folder only after every file is verified, so its presence
means "complete"; a folder without it is a partial (resumable) download.
"""

from __future__ import annotations

from pathlib import Path

from dsv4cli.gguf_io.read import read_recipe
from dsv4cli.home import gguf_dir
from dsv4cli.models.registry import ModelSpec

STATE_PREFIX = ".dsv4-"  # every name dsv4 keeps in a checkpoint folder starts with this; no Hub file may
MANIFEST_NAME = ".dsv4-pull.json"
LOCK_NAME = ".dsv4-pull.lock"


def checkpoint_state(folder: Path) -> str | None:
    """'complete', 'partial', or None when nothing was pulled there (a lock file alone is not a pull)."""
    if (folder / MANIFEST_NAME).is_file():
        return "complete"
    if folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir()):
        return "partial"
    return None


def foreign_entries(folder: Path) -> list[str]:
    """Names in `folder` that dsv4 did not put there as its own state (checkpoint files, or a user's)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(STATE_PREFIX))


def default_gguf_path(spec: ModelSpec, tag: str) -> Path:
    """Where `dsv4 quantize NAME` writes when no `-o` is given; the recipe (`output_tag`) is part of the name."""
    return gguf_dir() / f"{spec.slug}-{tag}.gguf"


def local_ggufs(spec: ModelSpec) -> list[Path]:
    """Quantized files of this model under `$DSV4_HOME/gguf` (first shard only for split files)."""
    found = sorted(gguf_dir().glob(f"{spec.slug}-*.gguf"))
    return [p for p in found if "-of-" not in p.name or "-00001-of-" in p.name]


def find_gguf(spec: ModelSpec, *, experts: str, dense: str) -> Path | None:
    """The local GGUF of this model whose header records this recipe (the file name is not trusted)."""
    wanted = {"experts": experts, "dense": dense}
    return next((p for p in local_ggufs(spec) if read_recipe(p) == wanted), None)
