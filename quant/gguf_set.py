"""Split GGUF sets: shard names, the set id every shard of one conversion carries, and the check readers use.

A set is committed first-shard-last (see `quant.gguf_out`), so a kill during the commit leaves a set without its
first shard, which nothing opens. `complete_split_set` also compares the set id of every shard, for readers that
could race with a commit or for sets assembled by hand.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from gguf import GGUFReader

from quant.errors import OutputError
from quant.mapping import KeyValue, TensorSpec

SET_ID_KEY = "dsv4.split.set_id"
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


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def complete_split_set(first: Path) -> list[Path]:
    """Every shard of the split GGUF whose first shard is `first` (or `[first]` for a single file), after
    checking that all shards exist and belong to one conversion (same `split.count` and set id, right `split.no`).

    Raises OutputError (one line, naming the shard) for a later shard given first, a missing shard or a set
    mixing shards of different conversions.
    """
    first = Path(first)
    m = SHARD_NAME.match(first.name)
    if m is None:
        return [first]
    count = int(m["count"])
    if int(m["no"]) != 1:
        raise OutputError(f"{first}: not the first shard of a split GGUF", hint=f"pass {m['stem']}-00001-of-*.gguf")
    shards = [first.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    hint = "re-create the set with `dsv4 quantize`, or download every shard again"
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:  # checked before any header: a missing shard is the common case and the clearest message
        raise OutputError(f"{first}: split GGUF is missing {missing[0]}", hint=hint)
    ids = set()
    for no, shard in enumerate(shards):
        try:
            reader = GGUFReader(shard)
        except Exception as e:  # gguf-py raises ValueError, struct/IndexError, numpy errors on garbage
            raise OutputError(f"{shard}: not a readable GGUF file ({e})", hint=hint) from e
        if _field(reader, "split.no") != no or _field(reader, "split.count") != count:
            raise OutputError(f"{shard}: split.no/split.count do not match its name", hint=hint)
        ids.add(_field(reader, SET_ID_KEY))
    if len(ids) > 1:
        raise OutputError(f"{first}: shards of different conversions are mixed in this split set", hint=hint)
    return shards
