"""The one GGUF header reader: key/value fields and the tensor list, parsed with explicit limits, data never read.

A GGUF from a stranger is untrusted: gguf-py's GGUFReader memory-maps the whole file and trusts every count
(a flipped byte becomes a 2**60-element array or an IndexError), so dsv4 parses headers here instead. The checks
are llama.cpp's own (`ggml/src/gguf.cpp`, `gguf_init_from_reader`: version, counts, no nested arrays, unique keys
and tensor names, at most 4 dims, known types, rows a multiple of the block size, tensor data laid out back to
back at the declared alignment, inside the file) plus caps on what a header may cost us to read, so a file that
passes here is one llama.cpp's parser accepts, and a hostile one costs at most `MAX_HEADER_BYTES` of reading.

The bytes come from a `ByteSource`: a local file (`FileSource`, regular files only) or anything that can read a
byte range, such as an HTTP range request for a Hub file's header, which parses with the same code.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quant.errors import CheckpointError
from quant.files import open_regular, shown
from quant.gguf_keys import ALIGNMENT
from quant.mapping import TensorSpec

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # llama.cpp rejects v1 and anything newer than 3
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # tensor names are shorter than this (ggml.h)
GGML_TYPE_COUNT = 43  # types llama.cpp 0.3.36 knows are below this (ggml.h); gguf-py must know the block size too
KNOWN_TYPES = {int(t): size for t, size in GGML_QUANT_SIZES.items() if int(t) < GGML_TYPE_COUNT}
# Caps on what reading a header may cost. A DeepSeek V4 header is about 5 MB (129k-token vocabulary and merges,
# ~2k tensors); these are an order of magnitude above any real model and keep a hostile header to a few hundred MB.
MAX_HEADER_BYTES = 64 << 20
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 17
MAX_ELEMENTS = 1 << 22  # array elements in all fields together
MAX_STRING = 16 << 20
MAX_KEY = 1 << 16
INT64_MAX = (1 << 63) - 1
HINT = "the file is damaged or not a GGUF; download it again or re-create it with `dsv4 quantize`"

# GGUF value types (gguf.md): struct format of the scalar ones; 8 = string, 9 = array.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY, UINT32 = 8, 9, 4


class GgufHeaderError(CheckpointError):
    """A GGUF header that is truncated, malformed, or past a limit; the message names the file and the place."""


class ByteSource(Protocol):
    """Random access to a file's bytes: `name` for messages, `size` in bytes, and `read_at` (may return less at
    the end). A remote source reads byte ranges; the parser asks for at most a few MiB at a time."""

    name: str
    size: int

    def read_at(self, offset: int, length: int) -> bytes: ...


class FileSource:
    """A local regular file (a FIFO, a device or /dev/zero behind a symlink is refused before any read)."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        try:
            self._fd = open_regular(path)
        except CheckpointError as e:
            raise GgufHeaderError(str(e), hint=HINT) from e
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as e:
            raise GgufHeaderError(f"{self.name}: cannot read ({e.strerror or e})", hint=HINT) from e

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class GgufFile:
    """What a header declares: its fields (arrays as lists) and tensors in file order, with exact byte sizes."""

    name: str
    version: int
    fields: dict[str, Any]
    tensors: tuple[TensorSpec, ...]
    alignment: int
    data_offset: int  # where the data section starts; tensor i starts at data_offset + offsets[i]
    size: int  # the file's size


class _Cursor:
    """Sequential reads through a source, buffered, never past `MAX_HEADER_BYTES` or the end of the file."""

    CHUNK = 1 << 20

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.limit = min(source.size, MAX_HEADER_BYTES)
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the next byte

    def fail(self, what: str) -> GgufHeaderError:
        return GgufHeaderError(f"{self.source.name} is not a readable GGUF file: {what}", hint=HINT)

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > self.limit:
            if end > self.source.size:
                raise self.fail(f"truncated: {what} at byte {self.pos} runs past the end of the file")
            raise self.fail(f"header larger than the {MAX_HEADER_BYTES >> 20} MiB limit (at {what})")
        if end > self.base + len(self.buf):
            keep = self.buf[self.pos - self.base :]
            want = max(n - len(keep), self.CHUNK)
            more = self.source.read_at(self.base + len(self.buf), min(want, self.limit - self.base - len(self.buf)))
            self.buf, self.base = keep + more, self.pos
            if end > self.base + len(self.buf):
                raise self.fail(f"truncated: {what} at byte {self.pos} could not be read (file shrank?)")
        start = self.pos - self.base
        self.pos = end
        return self.buf[start : start + n]

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = MAX_STRING) -> bytes:
        n = self.unpack("Q", what)
        if n > limit:
            raise self.fail(f"{what} is {n} bytes long, more than the {limit}-byte limit")
        return self.take(n, what)


def parse_header(source: ByteSource, *, keep: Callable[[str], bool] | None = None) -> GgufFile:
    """Parse and check the header of `source`; fields for which `keep(key)` is false are skipped, not decoded.

    Raises GgufHeaderError (one line naming the file and the key, tensor or byte offset).
    """
    cur = _Cursor(source)
    if cur.take(4, "magic") != MAGIC:
        raise cur.fail("no GGUF magic at its start")
    version = cur.unpack("I", "version")
    if version not in VERSIONS:
        raise cur.fail(f"GGUF version {version} is not supported (2 or 3; big-endian files are not)")
    n_tensors, n_kv = cur.unpack("q", "tensor count"), cur.unpack("q", "key count")
    if not 0 <= n_tensors <= MAX_TENSORS:
        raise cur.fail(f"tensor count {n_tensors} is outside 0..{MAX_TENSORS}")
    if not 0 <= n_kv <= MAX_KV:
        raise cur.fail(f"key count {n_kv} is outside 0..{MAX_KV}")
    fields, types = _read_fields(cur, n_kv, keep)
    alignment = fields.get(ALIGNMENT, DEFAULT_ALIGNMENT)
    if ALIGNMENT in types and types[ALIGNMENT] != UINT32:
        raise cur.fail(f"{ALIGNMENT} must be a uint32")
    if alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"{ALIGNMENT} {alignment} is not a power of 2")
    tensors, offsets = _read_tensors(cur, n_tensors)
    data_offset = -(-cur.pos // alignment) * alignment
    _check_layout(cur, tensors, offsets, data_offset, alignment)
    return GgufFile(source.name, version, fields, tuple(tensors), alignment, data_offset, source.size)


def _read_fields(cur: _Cursor, n_kv: int, keep: Callable[[str], bool] | None) -> tuple[dict, dict]:
    fields: dict[str, Any] = {}
    types: dict[str, int] = {}
    elements = 0
    for i in range(n_kv):
        key = _decode(cur, cur.string(f"key {i}", MAX_KEY), f"key {i}")
        if not key:
            raise cur.fail(f"key {i} is empty")
        if key in types:
            raise cur.fail(f"duplicate key {shown(key)}")
        vtype = cur.unpack("I", f"type of {key}")
        wanted = keep is None or keep(key) or key == ALIGNMENT
        if vtype == ARRAY:
            sub, n = cur.unpack("I", f"array type of {key}"), cur.unpack("Q", f"length of {key}")
            elements += n
            if elements > MAX_ELEMENTS:
                raise cur.fail(f"{shown(key)}: arrays hold more than {MAX_ELEMENTS} elements in all")
            if sub not in SCALARS and sub != STRING:
                raise cur.fail(f"{shown(key)}: array element type {sub} is not a GGUF scalar or string type")
            value = _array(cur, key, sub, n, decode=wanted)
        elif vtype in SCALARS or vtype == STRING:
            value = _scalar(cur, key, vtype)
        else:
            raise cur.fail(f"{shown(key)} has unknown GGUF value type {vtype}")
        types[key] = vtype
        if wanted:
            fields[key] = value
    return fields, types


def _scalar(cur: _Cursor, key: str, vtype: int) -> Any:
    if vtype == STRING:
        return cur.string(f"value of {key}").decode("utf-8", errors="replace")
    return cur.unpack(SCALARS[vtype], f"value of {key}")


def _array(cur: _Cursor, key: str, sub: int, n: int, *, decode: bool) -> list[Any] | None:
    if sub != STRING:
        fmt = SCALARS[sub]
        raw = cur.take(n * struct.calcsize(fmt), f"array {key}")
        return list(struct.unpack(f"<{n}{fmt}", raw)) if decode else None
    out = []
    for j in range(n):
        text = cur.string(f"element {j} of {key}")
        if decode:
            out.append(text.decode("utf-8", errors="replace"))
    return out if decode else None


def _decode(cur: _Cursor, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise cur.fail(f"{what} is not UTF-8 ({shown(raw)})") from e


def _read_tensors(cur: _Cursor, n_tensors: int) -> tuple[list[TensorSpec], list[int]]:
    tensors: list[TensorSpec] = []
    offsets: list[int] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = _decode(cur, cur.string(f"name of tensor {i}", GGML_MAX_NAME - 1), f"name of tensor {i}")
        if name in seen:
            raise cur.fail(f"duplicate tensor name {shown(name)}")
        seen.add(name)
        n_dims = cur.unpack("I", f"dimension count of {name}")
        if n_dims > GGML_MAX_DIMS:
            raise cur.fail(f"tensor {shown(name)} has {n_dims} dimensions; at most {GGML_MAX_DIMS}")
        ne = tuple(cur.unpack("q", f"shape of {name}") for _ in range(n_dims))
        if any(d < 0 for d in ne) or math.prod(ne) > INT64_MAX:
            raise cur.fail(f"tensor {shown(name)} has an impossible shape {list(ne)}")
        ggml_type = cur.unpack("I", f"type of {name}")
        if ggml_type not in KNOWN_TYPES:
            raise cur.fail(f"tensor {shown(name)} has ggml type {ggml_type}, which llama.cpp does not know")
        block, type_size = KNOWN_TYPES[ggml_type]
        if ne and ne[0] % block:
            kind = GGMLQuantizationType(ggml_type).name
            raise cur.fail(f"tensor {shown(name)}: row of {ne[0]} is not a multiple of the {kind} block ({block})")
        nbytes = math.prod(ne) // block * type_size
        tensors.append(TensorSpec(name, ne, ggml_type, nbytes))
        offsets.append(cur.unpack("Q", f"data offset of {name}"))
    return tensors, offsets


def _check_layout(cur: _Cursor, tensors: list[TensorSpec], offsets: list[int], data: int, alignment: int) -> None:
    """Tensor data back to back in header order, each padded to the alignment (what llama.cpp requires), and
    inside the file: no overlap, no gap, nothing past the end."""
    expected = 0
    for spec, offset in zip(tensors, offsets, strict=True):
        if offset != expected:
            raise cur.fail(
                f"tensor {shown(spec.name)} has data offset {offset}, expected {expected} (overlapping, out of "
                f"order or misaligned tensor data)"
            )
        if data + offset + spec.nbytes > cur.source.size:
            raise cur.fail(
                f"tensor {shown(spec.name)} ends at byte {data + offset + spec.nbytes}, past the end of the file "
                f"({cur.source.size} bytes): truncated or damaged"
            )
        expected += -(-spec.nbytes // alignment) * alignment


def read_gguf_header(path: Path, *, keep: Callable[[str], bool] | None = None) -> GgufFile:
    """`parse_header` of a local file."""
    source = FileSource(Path(path))
    try:
        return parse_header(source, keep=keep)
    finally:
        source.close()
