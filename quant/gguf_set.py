"""Split GGUF sets: shard names, the set id every shard of one conversion carries, and the check readers use.

A set is committed first-shard-last (see `quant.gguf_out`), so a kill during the commit leaves a set without its
first shard, which nothing opens. `complete_split_set` also compares the set id of every shard, for readers that
could race with a commit or for sets assembled by hand.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from quant.errors import OutputError
from quant.gguf_header import GgufFile, read_gguf_header
from quant.gguf_keys import SET_ID_KEY
from quant.mapping import KeyValue, TensorSpec

SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def output_paths(out: Path, n_shards: int) -> list[Path]:
    """Final file names: `out` itself, or `<stem>-0000X-of-0000N.gguf` shards."""
    if n_shards == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i + 1:05d}-of-{n_shards:05d}.gguf") for i in range(n_shards)]


def set_id(kv: list[KeyValue], specs: list[TensorSpec]) -> str:
    """A digest of everything the header declares: shards of one conversion share it, another run's differ
    unless it wrote the same header from the same inputs."""
    digest = hashlib.sha256()
    for key, value, _, _ in kv:
        digest.update(json.dumps([key, value], default=str).encode())
    for spec in specs:
        digest.update(f"{spec.name}:{spec.ne}:{spec.ggml_type}".encode())
    return digest.hexdigest()[:32]


def complete_split_set(first: Path) -> list[Path]:
    """Every shard of the split GGUF whose first shard is `first` (or `[first]` for a single file), after
    checking that all shards exist and belong to one conversion (same `split.count` and set id, right `split.no`).

    Raises OutputError (one line, naming the shard) for a later shard given first, a missing shard or a set
    mixing shards of different conversions, GgufHeaderError for a shard whose header is damaged.
    """
    return list(read_split_set(first))


def read_split_set(first: Path, *, keep: Callable[[str], bool] | None = None) -> dict[Path, GgufFile]:
    """The checked header of every shard (see `complete_split_set`), in shard order; `keep` as in
    `quant.gguf_header.parse_header` (the split keys are always read)."""
    first = Path(first)
    m = SHARD_NAME.match(first.name)
    if m is None:
        return {first: read_gguf_header(first, keep=keep)}
    count = int(m["count"])
    if int(m["no"]) != 1:
        raise OutputError(f"{first}: not the first shard of a split GGUF", hint=f"pass {m['stem']}-00001-of-*.gguf")
    shards = [first.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    hint = "re-create the set with `dsv4 quantize`, or download every shard again"
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:  # checked before any header: a missing shard is the common case and the clearest message
        raise OutputError(f"{first}: split GGUF is missing {missing[0]}", hint=hint)
    split_keys = {"split.no", "split.count", SET_ID_KEY}
    headers = {}
    for no, shard in enumerate(shards):
        header = read_gguf_header(shard, keep=lambda key: key in split_keys or keep is None or keep(key))
        fields = header.fields
        if fields.get("split.no") != no or fields.get("split.count") != count:
            raise OutputError(f"{shard}: split.no/split.count do not match its name", hint=hint)
        headers[shard] = header
    if len({h.fields.get(SET_ID_KEY) for h in headers.values()}) > 1:
        raise OutputError(f"{first}: shards of different conversions are mixed in this split set", hint=hint)
    return headers
