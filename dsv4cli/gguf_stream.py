"""ADAPTER until the bounded GGUF header parser (branch fuzz8: `quant.gguf_header.parse_header(ByteSource)`) is
in main: read the headers of a GGUF (every shard of a split set) from `ByteSource`s (name, size, `read_at`), the
same interface, so a Hub file (`dsv4cli.remote_file.HubByteSource`) is read like a local one. Only the header is
read: key/values (tokenizer arrays skipped) and the tensor table; each tensor's bytes come from its type's block
size. Every count and length is bounded before it is used, so a hostile header costs at most those bounds.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from dsv4cli.errors import PlanError
from dsv4cli.gguf_read import GgufHeader

MAX_STRING = 64 << 20
MAX_ITEMS = 1 << 28
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 20
MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


CHUNK = 1 << 20


class ByteSource(Protocol):
    name: str
    size: int

    def read_at(self, offset: int, length: int) -> bytes: ...


class _Cursor:
    """Sequential reads through a source, a CHUNK at a time."""

    def __init__(self, source: ByteSource) -> None:
        self.source, self.name = source, source.name
        self.buf, self.base, self.pos = b"", 0, 0

    def fail(self, what: str) -> PlanError:
        return PlanError(f"{self.name}: not a readable GGUF header ({what})", hint="check the file or the repo")

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > self.source.size:
            raise self.fail(f"ends inside the header at byte {self.pos}")
        if end > self.base + len(self.buf):
            keep = self.buf[self.pos - self.base :] if self.pos < self.base + len(self.buf) else b""
            start = self.pos + len(keep)
            self.buf, self.base = keep + self.source.read_at(start, max(end - start, CHUNK)), self.pos
            if end > self.base + len(self.buf):
                raise self.fail(f"ends inside the header at byte {self.pos}")
        data = self.buf[self.pos - self.base : end - self.base]
        self.pos = end
        return data

    def skip(self, n: int) -> None:
        if self.pos + n > self.source.size:
            raise self.fail(f"ends inside the header at byte {self.pos}")
        self.pos += n

    def scalar(self, kind: int) -> Any:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, limit: int, what: str) -> int:
        n = self.scalar(10)
        if n > limit:
            raise self.fail(f"{what} {n} is over the limit {limit}")
        return n

    def string(self) -> str:
        return self.take(self.count(MAX_STRING, "string length")).decode("utf-8", errors="replace")

    def value(self, kind: int, *, keep: bool) -> Any:
        if kind == STRING:
            return self.string()
        if kind in _SCALARS:
            return self.scalar(kind)
        if kind != ARRAY:
            raise self.fail(f"unknown value type {kind}")
        item = self.scalar(4)
        n = self.count(MAX_ITEMS, "array length")
        if not keep and item in _SCALARS:  # skipped without reading, e.g. tokenizer scores
            self.skip(n * struct.calcsize(_SCALARS[item]))
            return None
        values = [self.value(item, keep=keep) for _ in range(n)]
        return values if keep else None


def read_header_from(files: Sequence[tuple[Path, ByteSource]]) -> GgufHeader:
    """The header of a GGUF from its shards' byte sources (first shard first); `Path` names each shard."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from quant.mapping import TensorSpec

    fields: dict[str, Any] = {}
    tensors: list[TensorSpec] = []
    for _, source in files:
        cur = _Cursor(source)
        if cur.take(4) != b"GGUF":
            raise cur.fail("no GGUF magic")
        if cur.scalar(4) not in (2, 3):
            raise cur.fail("unsupported version")
        n_tensors, n_kv = cur.count(MAX_TENSORS, "tensor count"), cur.count(MAX_KV, "key count")
        for _ in range(n_kv):
            key = cur.string()
            keep = not key.startswith("tokenizer.")  # as gguf_read.read_header: the vocabulary is not planned
            value = cur.value(cur.scalar(4), keep=keep)
            if keep:
                fields.setdefault(key, value)
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar(4)
            if n_dims > MAX_DIMS:
                raise cur.fail(f"tensor {name} has {n_dims} dimensions")
            shape = tuple(cur.scalar(10) for _ in range(n_dims))
            kind = cur.scalar(4)
            cur.scalar(10)  # data offset: not needed to plan
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise cur.fail(f"tensor {name} has unknown type {kind}") from None
            elements = 1
            for n in shape:
                elements *= n
            tensors.append(TensorSpec(name, shape, kind, elements * type_size // block))
    return GgufHeader(tuple(p for p, _ in files), fields, tuple(tensors))
