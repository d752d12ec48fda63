"""Pre-quantized GGUF repos: which files of a repo a `:TAG` names, and where a pulled one is on disk.

The matching follows llama.cpp's `-hf repo:quant` (`common/download.cpp`, `find_best_model` and
`get_gguf_split_info`): the tag is searched case-insensitively in each file's path followed by `.` or `-`
(so `UD-Q2_K_XL` finds `UD-Q2_K_XL/Model-UD-Q2_K_XL-00001-of-00003.gguf`); without a tag Q4_K_M, then Q8_0, then
the first GGUF is taken. Projector, imatrix and draft-model files are never the model. A split set is every
`PREFIX-NNNNN-of-MMMMM.gguf` with the first shard's prefix and count.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from dsv4cli.errors import IntegrityError, UsageError
from dsv4cli.models.registry import ModelSpec, get_model

if TYPE_CHECKING:
    from dsv4cli.hub.api import RepoListing

DEFAULT_TAGS = ("Q4_K_M", "Q8_0")
NOT_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
SPLIT_RE = re.compile(r"^(.+)-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
MAX_LISTED = 8  # GGUF sets named in a "no such tag" hint


def is_model_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.endswith(".gguf") and not any(word in name for word in NOT_MODEL)


def _split(path: str) -> tuple[str, int, int]:
    """(prefix, index, count) of a shard name; (path, 1, 1) for a single file."""
    m = SPLIT_RE.match(path)
    return (m[1], int(m[2]), int(m[3])) if m else (path, 1, 1)


def set_name(path: str) -> str:
    """The name of the GGUF a shard belongs to: `x-00001-of-00003.gguf` -> `x.gguf`."""
    prefix, _, count = _split(path)
    return f"{prefix}.gguf" if count > 1 else path


def is_gguf_repo(paths: Iterable[str]) -> bool:
    """A repo of GGUFs rather than a checkpoint: model GGUFs and no config.json at the top."""
    names = list(paths)
    return "config.json" not in names and any(is_model_file(p) for p in names)


def first_shards(paths: Iterable[str]) -> list[str]:
    """Every model GGUF (the first shard of a split set), in name order."""
    return sorted(p for p in paths if is_model_file(p) and _split(p)[1] == 1)


def select_quant(paths: Iterable[str], tag: str | None, *, repo: str) -> list[str]:
    """The files of the GGUF `tag` names (all shards, in order); without a tag llama.cpp's default choice.

    Raises:
        UsageError: no GGUF in the repo matches (the hint names what is there).
        IntegrityError: the repo lists only some shards of the chosen split set.
    """
    names = sorted(set(paths))
    firsts = first_shards(names)
    for wanted in [tag] if tag else DEFAULT_TAGS:
        pattern = re.compile(re.escape(wanted) + r"[.-]", re.IGNORECASE)
        chosen = next((p for p in firsts if pattern.search(p)), None)
        if chosen:
            return shard_set(names, chosen, repo=repo)
    if not tag and firsts:
        return shard_set(names, firsts[0], repo=repo)
    shown = ", ".join(firsts[:MAX_LISTED]) + (", ..." if len(firsts) > MAX_LISTED else "")
    raise UsageError(
        f"{repo}: no GGUF matches the tag {tag!r}" if tag else f"{repo}: the repo has no GGUF model file",
        hint=f"the repo has: {shown}" if firsts else "pick a repo with .gguf files",
    )


def select_file(paths: Iterable[str], file: str, *, repo: str) -> list[str]:
    """The files of one GGUF named by its path in the repo (`org/name/FILE.gguf`): it and its other shards.

    Raises:
        UsageError: the repo has no such model GGUF, or `file` is a later shard (the hint names the first).
        IntegrityError: the repo lists only some shards of its split set.
    """
    names = sorted(set(paths))
    firsts = first_shards(names)
    if file not in firsts:
        first = next((p for p in firsts if p in shard_candidates(names, file)), None)
        shown = ", ".join(firsts[:MAX_LISTED]) + (", ..." if len(firsts) > MAX_LISTED else "")
        raise UsageError(
            f"{repo}: no GGUF model file {file!r}" + (f" (it is a later shard of {first})" if first else ""),
            hint=f"the repo has: {shown}" if firsts else "pick a repo with .gguf files",
        )
    return shard_set(names, file, repo=repo)


def shard_candidates(names: list[str], file: str) -> list[str]:
    """Every listed shard of the split set `file` belongs to (just `file` for a single GGUF)."""
    prefix, _, count = _split(file)
    return [p for p in names if _split(p)[0] == prefix and _split(p)[2] == count]


def shard_set(names: list[str], first: str, *, repo: str) -> list[str]:
    count = _split(first)[2]
    if count == 1:
        return [first]
    shards = sorted(shard_candidates(names, first), key=lambda p: _split(p)[1])
    if [_split(p)[1] for p in shards] != list(range(1, count + 1)):
        raise IntegrityError(
            f"{repo}: {first} is one of {count} shards but the repo lists {len(shards)} of them",
            hint="the upload is incomplete; try another tag or come back later",
        )
    return shards


def tag_of(first: str, names: list[str]) -> str | None:
    """A tag that selects exactly the set starting at `first` among `names`: its folder (unsloth's layout), else
    the quant at the end of its name as llama.cpp reads it (`-Q4_K_M`); None when neither does."""
    prefix = _split(first)[0]
    candidates = [first.rsplit("/", 2)[-2]] if "/" in first else []
    m = re.search(r"[-.]([A-Za-z0-9_]+)$", prefix)
    candidates += [m[1].upper()] if m else []
    for tag in candidates:
        try:
            if select_quant(names, tag, repo="")[0] == first:
                return tag
        except (UsageError, IntegrityError):
            continue
    return None


def gguf_repos(spec: ModelSpec) -> tuple[str, ...]:
    """The GGUF repos a model name stands for: a registry entry's `gguf_repos`, or an ad-hoc repo itself."""
    if spec.gguf_repos:
        return spec.gguf_repos
    return (spec.repo,) if spec.repo and spec.name == spec.repo else ()


def find_local(spec: ModelSpec, tag: str | None, *, file: str | None = None) -> Path | None:
    """The first shard of a completely pulled GGUF of this model and tag (or this one `file` of the model's own
    repo), without asking the Hub.

    Only files the pull manifest records (verified) count, so a half-finished download is never picked.
    """
    from dsv4cli.hub.manifest import read_manifest

    repos = (spec.repo,) if file and spec.repo else gguf_repos(spec)
    for repo in repos:
        folder = get_model(repo).local_dir if not file else spec.local_dir
        recorded = list(read_manifest(folder).get("files", {}))
        if not is_gguf_repo(recorded) and not file:
            continue
        try:
            shards = select_file(recorded, file, repo=repo) if file else select_quant(recorded, tag, repo=repo)
        except (UsageError, IntegrityError):
            continue
        return folder / shards[0]
    return None


def find_on_hub(
    spec: ModelSpec, tag: str | None, listing_of: Callable[[ModelSpec], RepoListing], *, file: str | None = None
) -> tuple[ModelSpec, RepoListing, list[str]]:
    """The first of the model's GGUF repos with a GGUF matching `tag`: its spec, listing and the files; with
    `file`, that GGUF of the model's own repo.

    Raises:
        UsageError: none of them has one (a model without GGUF repos says how to get one).
    """
    if file:
        listing = listing_of(spec)
        return spec, listing, select_file((f.path for f in listing.files), file, repo=spec.repo or spec.name)
    repos = gguf_repos(spec)
    if not repos:
        raise UsageError(
            f"{spec.name}: a tag picks a pre-quantized GGUF, and this model names no GGUF repo",
            hint=f"give the repo (`ORG/NAME-GGUF:TAG`), or `dsv4 pull {spec.name}` and `dsv4 quantize {spec.name}`",
        )
    last: UsageError | None = None
    for repo in repos:
        candidate = get_model(repo)
        listing = listing_of(candidate)
        try:
            return candidate, listing, select_quant((f.path for f in listing.files), tag, repo=repo)
        except UsageError as e:
            last = e
    assert last is not None
    if len(repos) == 1:
        raise last
    raise UsageError(f"{spec.name}: no GGUF tagged {tag!r} in {', '.join(repos)}", hint=last.hint)
