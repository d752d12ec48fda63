"""Memory-mapped safetensors reading (validated before any data is touched) and deterministic writing.

Official checkpoints are hundreds of GB, so nothing here reads a whole shard: headers are parsed and checked
up front, tensors are zero-copy views into one read-only memory map per shard, mapped on first use.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quant.errors import CheckpointError

# safetensors dtype string -> numpy dtype of the raw little-endian payload. FP8 and E8M0 stay bytes;
# BF16 stays uint16 (numpy has no bfloat16); decoding is quant.codecs' job.
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E8M0": np.dtype("u1"),
    "F8_E8M0FNU": np.dtype("u1"),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PULL_HINT = "the download is incomplete or damaged; run `dsv4 pull MODEL` to complete it"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; `start`/`end` are absolute byte offsets in the shard file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _fail(path: Path, message: str, name: str | None = None) -> CheckpointError:
    where = f"{path}: tensor '{name}'" if name is not None else str(path)
    return CheckpointError(f"{where}: {message}", hint=PULL_HINT)


def _parse_entry(path: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _fail(path, "header entry needs dtype, shape and data_offsets", name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise _fail(path, f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})", name)
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(path, f"shape must be a list of non-negative integers, got {shape!r}", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _fail(path, f"data_offsets must be two integers, got {offsets!r}", name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _fail(path, f"data_offsets {offsets} lie outside the {data_size}-byte data area (file truncated?)", name)
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise _fail(path, f"{end - begin} bytes for {dtype} {shape} (expected {expected})", name)
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and fully validate a shard header; raises CheckpointError naming the file and tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"only {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise _fail(path, f"header length {header_len} exceeds the file size {size} (file truncated?)")
            if header_len > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {header_len} exceeds the format's {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(header_len)
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise _fail(path, "__metadata__ is not a JSON object")
    data_start = 8 + header_len
    infos = {name: _parse_entry(path, name, entry, data_start, size - data_start) for name, entry in header.items()}
    previous: TensorInfo | None = None
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if previous is not None and info.start < previous.end:
            raise _fail(path, f"data overlaps tensor '{previous.name}'", info.name)
        previous = info if info.nbytes else previous
    return infos


class SafetensorsFile:
    """One shard: validated header now, a read-only memory map on first tensor access."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = read_header(self.path)
        self._map: mmap.mmap | None = None

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of the stored payload (uint8 for FP8/E8M0, uint16 for BF16)."""
        info = self.tensors.get(name)
        if info is None:
            raise _fail(self.path, "not in this shard's header", name)
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            empty = np.empty(info.shape, dtype=dtype)
            empty.flags.writeable = False
            return empty
        if self._map is None:
            with self.path.open("rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(self._map) < info.end:
            raise _fail(self.path, f"file shrank to {len(self._map)} bytes after its header was read", name)
        return np.frombuffer(self._map, dtype=dtype, count=info.nbytes // dtype.itemsize, offset=info.start).reshape(
            info.shape
        )

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set (they stay in the page cache).

        Mapped pages count towards RSS until the kernel needs them back; streaming a whole checkpoint would
        otherwise look like holding it in memory. Views stay valid: a later access faults the pages back in.
        """
        info = self.tensors[name]
        if self._map is None or info.nbytes == 0:
            return
        start = info.start - info.start % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, info.end - start)


def load_json(path: Path, what: str) -> Any:
    """A JSON file of a checkpoint folder; a missing or unreadable one is a damaged download (pull hint)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: {what} is missing", hint=PULL_HINT) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not readable JSON ({e})", hint=PULL_HINT) from e


def _read_weight_map(folder: Path) -> dict[str, str]:
    index_path = folder / INDEX_NAME
    if not index_path.exists() and (folder / SINGLE_NAME).exists():
        return {name: SINGLE_NAME for name in read_header(folder / SINGLE_NAME)}
    index = load_json(index_path, "the safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) and "/" not in shard and "\\" not in shard for shard in weight_map.values()
    ):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names", hint=PULL_HINT)
    return weight_map


class Checkpoint:
    """A checkpoint folder: config.json plus shards named by the index (or one model.safetensors).

    Every shard header is validated on construction, and every weight_map entry is checked against its shard,
    so a missing or damaged shard is reported before any conversion work starts.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a checkpoint folder", hint=PULL_HINT)
        self.config: dict[str, Any] = load_json(self.folder / "config.json", "config.json")
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.folder / 'config.json'}: not a JSON object", hint=PULL_HINT)
        self._weight_map = _read_weight_map(self.folder)
        self._shards: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(self._weight_map.values())):
            path = self.folder / shard
            if not path.is_file():
                missing = [n for n, s in self._weight_map.items() if s == shard]
                raise CheckpointError(
                    f"{path}: shard is missing (holds {len(missing)} tensors, e.g. '{missing[0]}')",
                    hint=f"run `dsv4 pull MODEL` to complete the download of {shard}",
                )
            self._shards[shard] = SafetensorsFile(path)
        for name, shard in self._weight_map.items():
            if name not in self._shards[shard].tensors:
                raise _fail(self.folder / shard, f"listed in {INDEX_NAME} but absent from the shard header", name)

    def names(self) -> list[str]:
        """Tensor names in index order."""
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def shard_of(self, name: str) -> SafetensorsFile:
        shard = self._weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is not in the checkpoint")
        return self._shards[shard]

    def info(self, name: str) -> TensorInfo:
        return self.shard_of(name).tensors[name]

    def raw(self, name: str) -> np.ndarray:
        return self.shard_of(name).raw(name)


def _header_bytes(tensors: Mapping[str, tuple[str, np.ndarray]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, (dtype, array) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def _as_payload(name: str, dtype: str, array: np.ndarray) -> np.ndarray:
    """The array as the stored little-endian type; integers of the right width are reinterpreted (U8 -> I8)."""
    target = DTYPES.get(dtype)
    if target is None:
        raise ValueError(f"tensor '{name}': unknown safetensors dtype {dtype!r}")
    array = np.asarray(array)
    same_kind = array.dtype.kind == target.kind or {array.dtype.kind, target.kind} <= {"i", "u"}
    if not same_kind or array.dtype.itemsize != target.itemsize:
        raise ValueError(f"tensor '{name}': a {array.dtype} array cannot be stored as {dtype}")
    return np.require(array.astype(array.dtype.newbyteorder("<"), copy=False).view(target), requirements="C")


def write_safetensors(
    path: Path, tensors: Mapping[str, tuple[str, np.ndarray]], *, metadata: Mapping[str, str] | None = None
) -> int:
    """Write tensors (in the given order) to `path` atomically; returns the payload byte count.

    Output depends only on the inputs (compact JSON, space padding to 8 bytes), so reruns are byte-identical.
    """
    path = Path(path)
    payloads = {name: (dtype, _as_payload(name, dtype, array)) for name, (dtype, array) in tensors.items()}
    header = _header_bytes(payloads, metadata if metadata is not None else {"format": "pt"})
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for _, array in payloads.values():
                f.write(array.reshape(-1).view(np.uint8))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sum(array.nbytes for _, array in payloads.values())
