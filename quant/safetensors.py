"""Safetensors reading (every header validated before any data is touched) and deterministic writing.

Official checkpoints are hundreds of GB, so nothing here reads a whole shard: headers are parsed and checked
up front, and tensors are read by rows on demand (`Checkpoint.read`), the one reader the converter and the
tests share.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quant.errors import CheckpointError
from quant.files import PULL_HINT, load_json_object, open_regular, shown

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
# Real shard headers are well under 1 MiB (about 150 bytes per tensor); the format itself allows 100 MB.
MAX_HEADER_BYTES = 16 << 20
MAX_DIMS = 8
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


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
    where = f"{path}: tensor '{shown(name)}'" if name is not None else str(path)
    return CheckpointError(f"{where}: {message}", hint=PULL_HINT)


def _parse_entry(path: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _fail(path, "header entry needs dtype, shape and data_offsets", name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise _fail(path, f"unknown dtype {shown(dtype)} (known: {', '.join(DTYPES)})", name)
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(path, f"shape must be a list of non-negative integers, got {shown(shape)}", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _fail(path, f"data_offsets must be two integers, got {shown(offsets)}", name)
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
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise _fail(path, f"only {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise _fail(path, f"header length {header_len} exceeds the file size {size} (file truncated?)")
        if header_len > MAX_HEADER_BYTES:
            raise _fail(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = os.pread(fd, header_len, 8)
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from e
    finally:
        os.close(fd)
    if len(raw) != header_len:
        raise _fail(path, "file shrank while its header was read")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else "nested too deeply"
        raise _fail(path, f"header is not valid JSON ({reason})") from e
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


def _valid_shard_name(shard: object) -> bool:
    """A plain file name inside the checkpoint folder: no separators, no `..`, no control characters."""
    return (
        isinstance(shard, str)
        and 0 < len(shard) <= 255
        and shard not in (".", "..")
        and not any(c in shard for c in "/\\:")
        and shard.isprintable()
    )


def _read_weight_map(folder: Path) -> dict[str, str]:
    index_path = folder / INDEX_NAME
    if not index_path.exists() and (folder / SINGLE_NAME).exists():
        return dict.fromkeys(read_header(folder / SINGLE_NAME), SINGLE_NAME)
    index = load_json_object(index_path, "the safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names", hint=PULL_HINT)
    for name, shard in weight_map.items():
        if not _valid_shard_name(shard):
            raise CheckpointError(
                f"{index_path}: tensor '{shown(name)}' names shard {shown(repr(shard))}, which is not a file name "
                "in the checkpoint folder",
                hint=PULL_HINT,
            )
    return weight_map


class Checkpoint:
    """A checkpoint folder: config.json plus shards named by the index (or one model.safetensors).

    Every shard header is validated on construction, and every weight_map entry is checked against its shard,
    so a missing or damaged shard is reported before any conversion work starts. Tensor data is read with
    pread into fresh buffers, not through memory maps: mapped pages stay resident (and count as RSS) until the
    shard is closed, so streaming a 160 GB model would look like a 160 GB process; reading only the rows in
    use keeps memory bounded by what the caller asks for. Use as a context manager (or call `close()`).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a checkpoint folder", hint=PULL_HINT)
        self.config: dict[str, Any] = load_json_object(self.folder / "config.json", "config.json")
        self._weight_map = _read_weight_map(self.folder)
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        self._fds: dict[str, int] = {}
        for shard in sorted(set(self._weight_map.values())):
            path = self.folder / shard
            if not path.exists():
                missing = [n for n, s in self._weight_map.items() if s == shard]
                raise CheckpointError(
                    f"{path}: shard is missing (holds {len(missing)} tensors, e.g. '{missing[0]}')",
                    hint=f"run `dsv4 pull MODEL` to complete the download of {shard}",
                )
            self._headers[shard] = read_header(path)
        for name, shard in self._weight_map.items():
            if name not in self._headers[shard]:
                raise _fail(self.folder / shard, f"listed in {INDEX_NAME} but absent from the shard header", name)

    def names(self) -> list[str]:
        """Tensor names in index order."""
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def path_of(self, name: str) -> Path:
        """The shard file holding tensor `name`."""
        shard = self._weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is not in the checkpoint")
        return self.folder / shard

    def info(self, name: str) -> TensorInfo:
        return self._headers[self.path_of(name).name][name]

    def _fd(self, name: str) -> int:
        """An open descriptor of the shard holding `name` (opened once, checked to still be long enough)."""
        shard = self.path_of(name).name
        fd = self._fds.get(shard)
        if fd is None:
            fd = open_regular(self.folder / shard)
            end = max((i.end for i in self._headers[shard].values()), default=0)
            if os.fstat(fd).st_size < end:
                os.close(fd)
                raise _fail(self.folder / shard, "file shrank after its header was read (changed while converting?)")
            self._fds[shard] = fd
        return fd

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read a tensor ahead (shards keep tensors in name order, not in conversion order,
        so plain readahead does not help)."""
        if hasattr(os, "posix_fadvise"):
            info = self.info(name)
            os.posix_fadvise(self._fd(name), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor as stored (uint8 for FP8/E8M0, uint16 for BF16; 1-D tensors as one
        row), in a fresh buffer."""
        info = self.info(name)
        shape = as_rows(info.shape)
        stop = shape[0] if stop is None else min(stop, shape[0])
        count = max(stop - start, 0)
        row_bytes = info.nbytes // max(shape[0], 1)
        want = count * row_bytes
        try:
            data = os.pread(self._fd(name), want, info.start + start * row_bytes) if want else b""
        except OSError as e:
            raise _fail(self.path_of(name), f"cannot read ({e.strerror or e})", name) from e
        if len(data) != want:
            raise _fail(self.path_of(name), "file ends early (truncated while converting?)", name)
        return np.frombuffer(data, dtype=DTYPES[info.dtype]).reshape(count, *shape[1:])

    def raw(self, name: str) -> np.ndarray:
        """The whole tensor in its stored shape."""
        return self.read(name).reshape(self.info(name).shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_rows(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape read row by row: 1-D (and scalar) tensors are one row."""
    return shape if len(shape) > 1 else (1, *shape)


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
