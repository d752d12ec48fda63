"""A streaming GGUF writer: tensor data is appended piece by piece, so no tensor (let alone the model) is held.

Built on gguf.GGUFWriter for the header, key/values, tensor infos and split naming/keys (`split.no`,
`split.count`, `split.tensors.count`, `-0000X-of-0000N.gguf`, what llama.cpp's loader expects). Files are written
in a hidden temporary folder next to the output and moved under their final names only when every shard is
complete; on any error or interrupt the folder is removed, and a folder left by a killed run is removed by the
next run, so a final name never holds a partial file.

A split set is committed so that no kill can leave a mixed old/new set that loads: the old first shard is
removed, shards 2..N are moved in, and the new first shard comes last (readers start from the first shard).
Every shard also carries `dsv4.split.set_id`, which `complete_split_set` checks for readers that could race
with a commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.gguf_writer import GGUFValue

from quant.errors import OutputError
from quant.mapping import KeyValue, TensorSpec

ALIGNMENT = 32  # GGUF default data alignment
SET_ID_KEY = "dsv4.split.set_id"
SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def temp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


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


class _Writer(GGUFWriter):
    """GGUFWriter that also stamps the split-set id into every shard's key/values."""

    set_id = ""

    def add_shard_kv_data(self) -> None:
        super().add_shard_kv_data()
        if len(self.tensors) > 1:
            for kv_data in self.kv_data:
                kv_data[SET_ID_KEY] = GGUFValue(self.set_id, GGUFValueType.STRING)


class StreamingGGUF:
    """`with StreamingGGUF(out, arch, kv, specs) as w:` then, in spec order, `w.begin(name)` and `w.append(bytes)`
    per piece, then `w.commit()` to move the files under their final names; an error in the block removes them.
    Tensors must come in the declared order (their offsets are fixed in the header): anything else raises."""

    def __init__(
        self,
        out: Path,
        arch: str,
        kv: Iterable[KeyValue],
        specs: list[TensorSpec],
        *,
        split_max_size: int = 0,
    ) -> None:
        self.out = Path(out)
        self.tmp = temp_dir_for(self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)  # left by a killed run
        self.tmp.mkdir(parents=True)
        self._order = [s.name for s in specs]
        self._next = 0
        self._current: tuple[str, BinaryIO, int] | None = None
        self._writer: _Writer | None = None
        try:
            self._start(arch, list(kv), specs, split_max_size)
        except BaseException:
            self.abort()
            raise

    def _start(self, arch: str, kv: list[KeyValue], specs: list[TensorSpec], split_max_size: int) -> None:
        self._writer = _Writer(self.tmp / self.out.name, arch, split_max_size=split_max_size)
        self._writer.set_id = set_id(kv, specs)
        for key, value, vtype, sub_type in kv:
            if key != "general.architecture":
                self._writer.add_key_value(key, value, vtype, sub_type)
        for spec in specs:
            self._writer.add_tensor_info(
                spec.name, tuple(reversed(spec.ne)), np.dtype(np.float32), spec.nbytes, spec.ggml_type
            )
        self._shard_of = {name: i for i, shard in enumerate(self._writer.tensors) for name in shard}
        self._nbytes = {s.name: s.nbytes for s in specs}
        self.paths = output_paths(self.out, len(self._writer.tensors))
        self._writer.write_header_to_file()
        self._writer.write_kv_data_to_file()
        self._writer.write_ti_data_to_file()

    def _files(self) -> list[BinaryIO]:
        assert self._writer is not None and self._writer.fout is not None
        return self._writer.fout

    def begin(self, name: str) -> None:
        """Start the next tensor, which must be the next one declared."""
        self._finish_current()
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            raise ValueError(f"tensor {name} written out of the declared order (expected {expected})")
        self._next += 1
        fout = self._files()[self._shard_of[name]]
        fout.write(b"\0" * (-fout.tell() % ALIGNMENT))
        self._current = (name, fout, 0)

    def append(self, data: np.ndarray) -> None:
        """Append bytes of the current tensor (any dtype; written as stored, little-endian)."""
        if self._current is None:
            raise ValueError("append() before begin()")
        name, fout, done = self._current
        data = np.ascontiguousarray(data)
        if done + data.nbytes > self._nbytes[name]:
            raise ValueError(f"tensor {name}: more than its {self._nbytes[name]} declared bytes")
        fout.write(memoryview(data).cast("B"))
        self._current = (name, fout, done + data.nbytes)

    def patch(self, marker: bytes, replacement: bytes) -> None:
        """Overwrite a same-length placeholder in the first shard's header (for values known only at the end)."""
        if len(marker) != len(replacement):
            raise ValueError("a header patch must keep the length")
        fout = self._files()[0]
        fout.flush()
        with open(fout.name, "r+b") as f:
            head = f.read(1 << 24)
            at = head.find(marker)
            if at < 0:
                raise ValueError("placeholder not found in the GGUF header")
            f.seek(at)
            f.write(replacement)

    def _finish_current(self) -> None:
        if self._current is None:
            return
        name, fout, done = self._current
        if done != self._nbytes[name]:
            raise ValueError(f"tensor {name}: wrote {done} bytes, expected {self._nbytes[name]}")
        fout.write(b"\0" * (-done % ALIGNMENT))
        self._current = None

    def commit(self, *, extra: dict[Path, Path] | None = None) -> list[Path]:
        """Close all shards and move them (and `extra` files written in `tmp`) under their final names."""
        self._finish_current()
        if self._next != len(self._order):
            raise ValueError(f"tensor {self._order[self._next]} was never written")
        for fout in self._files():
            fout.flush()
            os.fsync(fout.fileno())
        assert self._writer is not None
        self._writer.close()
        written = self._writer.format_shard_names(self.tmp / self.out.name)
        moves = list(zip(written, self.paths, strict=True))
        if len(moves) > 1:  # first shard last: until it is in place the set cannot be opened
            self.paths[0].unlink(missing_ok=True)
            moves = moves[1:] + moves[:1]
        for src, dst in [*moves, *(extra or {}).items()]:
            os.replace(src, dst)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.paths

    def abort(self) -> None:
        """Remove everything written; never raises (it runs while another error, often ENOSPC, propagates)."""
        for fout in (self._writer.fout if self._writer else None) or []:
            with contextlib.suppress(OSError):
                fout.close()  # a flush into a full disk fails; the descriptor is closed all the same
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StreamingGGUF:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()


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
    ids = set()
    for no, shard in enumerate(shards):
        if not shard.is_file():
            raise OutputError(f"{first}: split GGUF is missing {shard.name}", hint=hint)
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
