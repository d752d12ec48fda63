"""Plan a pre-quantized GGUF before downloading it: read only the headers of its shards over HTTP range requests
(`dsv4cli.hub.remote_file`) and place them exactly as the same files on disk would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsv4cli.errors import DownloadError, PlanError
from dsv4cli.gguf_io.read import TOKENIZER_PREFIX, GgufHeader
from dsv4cli.hub import api as hub
from dsv4cli.hub import gguf_repo
from dsv4cli.hub.remote_file import FetchBudget, HubByteSource
from dsv4cli.models.local import STATE_PREFIX
from dsv4cli.models.registry import ModelSpec
from dsv4cli.plan.source_facts import ModelSource, source_from_header
from quant.errors import QuantError
from quant.gguf_header import parse_header


def _listing(spec: ModelSpec) -> hub.RepoListing:
    assert spec.repo is not None
    listing = hub.list_repo(spec.repo, spec.revision)
    hub.check_listing(listing, reserved_prefix=STATE_PREFIX)  # names become local paths below
    return listing


@contextlib.contextmanager
def _reading_only() -> Iterator[None]:
    """A network failure while reading headers: the pull hint (partial files kept, resume) is not true here."""
    try:
        yield
    except DownloadError as e:
        if e.hint == hub.RESUME_HINT:
            e.hint = "nothing was downloaded; check the network or HF_ENDPOINT and run the command again"
        raise


MAX_SHARDS = 1024  # a 1.6T-parameter model in BF16 is ~640 shards of 5 GB; more is a hostile or broken repo


def _not_tokenizer(key: str) -> bool:
    return not key.startswith(TOKENIZER_PREFIX)  # the vocabulary is not planned (as gguf_read.read_header)


def remote_source(
    spec: ModelSpec, tag: str | None, *, file: str | None = None, budget: FetchBudget | None = None
) -> ModelSource:
    """The tensors of the GGUF `spec:tag` (or `spec.repo/file`) on the Hub, from its headers only.

    `files` are the paths `dsv4 pull` will give the shards, so `--llama-args` names where they will be;
    `fetched_bytes` is what the headers cost.
    """
    budget = budget or FetchBudget()
    with _reading_only():
        repo_spec, listing, paths = gguf_repo.find_on_hub(spec, tag, _listing, file=file)
    if len(paths) > MAX_SHARDS:
        raise PlanError(
            f"{listing.repo}: {paths[0]} is split into {len(paths)} shards (at most {MAX_SHARDS} are planned remotely)",
            hint="download it with `dsv4 pull` to plan it from disk",
        )
    remotes = {f.path: f for f in listing.files}
    folder = repo_spec.local_dir
    fields: dict[str, Any] = {}
    tensors: list[Any] = []
    with hub.open_client() as client, _reading_only():
        for path in paths:  # metadata in the first shard, tensors spread over all of them (as gguf_read)
            try:
                shard = parse_header(HubByteSource(client, listing, remotes[path], budget), keep=_not_tokenizer)
            except QuantError as e:
                raise PlanError(str(e), hint=getattr(e, "hint", None)) from e
            for key, value in shard.fields.items():
                fields.setdefault(key, value)
            tensors += shard.tensors
    header = GgufHeader(tuple(folder / p for p in paths), fields, tuple(tensors))
    source = source_from_header(header, Path(paths[0]).name)
    return dataclasses.replace(
        source, kind="remote", fetched_bytes=budget.fetched, download_bytes=sum(remotes[p].size for p in paths)
    )
