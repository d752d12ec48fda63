"""A streaming, resumable GGUF writer: tensor data is appended piece by piece, so no tensor (let alone the model)
is held, and a killed or interrupted run continues after the last tensor it completed.

gguf.GGUFWriter writes the header, key/values and tensor infos (and the split keys `split.no`, `split.count`,
`split.tensors.count`, `-0000X-of-0000N.gguf` naming that llama.cpp's loader expects) into a hidden temporary
folder next to the output; tensor data follows in the declared order. After each tensor a line goes into
`journal.jsonl` in that folder: where the tensor lies and the CRC-32 of its bytes, plus what the caller wants back
on resume. A later run with the same identity (same header, same source files, same options) re-reads the
journaled tensors, keeps the prefix whose checksums still match (a power cut can lose pages the journal
mentions) and continues from there, so the result is byte for byte what an uninterrupted run writes. Anything
else starts over.

Files move under their final names only when every shard is complete. A split set is committed so that no kill
can leave a mixed old/new set that loads: the old first shard is removed, shards 2..N are moved in, and the new
first shard comes last (readers start from the first shard; see `quant.gguf_set`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
from gguf import GGUFValueType, GGUFWriter
from gguf.gguf_writer import GGUFValue

from quant.errors import OutputError
from quant.gguf_keys import ARCHITECTURE, SET_ID_KEY
from quant.gguf_set import output_paths, set_id
from quant.mapping import KeyValue, TensorSpec
from quant.outlock import write_error

ALIGNMENT = 32  # GGUF default data alignment
JOURNAL = "journal.jsonl"
JOURNAL_FORMAT = 1
READ_BLOCK = 16 << 20


def temp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


_OPEN_FLAGS = {
    "rb": os.O_RDONLY,
    "r+b": os.O_RDWR,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}


def _open_own(path: Path, mode: str) -> Any:
    """Open one of the partial output's own files without following a symlink planted at its name (writes must
    never land in the file a link points to)."""
    try:
        fd = os.open(path, _OPEN_FLAGS[mode] | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symlink; refusing to follow it", hint="remove it and run again") from e
        raise write_error(e, path) from e
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def _no_link(path: Path) -> None:
    """Remove a symlink planted at one of the partial output's own folder names (never what it points to)."""
    if path.is_symlink():
        path.unlink()


@dataclass(frozen=True)
class Written:
    """One completed tensor: its shard, data range, trailing-padding end, CRC-32 and the caller's record."""

    name: str
    shard: int
    start: int
    end: int
    crc: int
    record: Any = None


class _Writer(GGUFWriter):
    """GGUFWriter that also stamps the split-set id into every shard's key/values."""

    set_id = ""

    def add_shard_kv_data(self) -> None:
        super().add_shard_kv_data()
        if len(self.tensors) > 1:
            for kv_data in self.kv_data:
                kv_data[SET_ID_KEY] = GGUFValue(self.set_id, GGUFValueType.STRING)


def _crc(fd: int, start: int, size: int) -> int | None:
    """CRC-32 of a file range, or None when the file is shorter."""
    crc, done = 0, 0
    while done < size:
        block = os.pread(fd, min(READ_BLOCK, size - done), start + done)
        if not block:
            return None
        crc, done = zlib.crc32(block, crc), done + len(block)
    return crc


class StreamingGGUF:
    """`with StreamingGGUF(out, arch, kv, specs) as w:` then, for each tensor after `w.resumed` in declared order,
    `w.begin(name)`, `w.append(bytes)` per piece and `w.finish(record)`; then `w.commit()` moves the files under
    their final names. Tensors out of the declared order, or of the wrong size, raise.

    An error in the block removes the temporary folder; an interrupt (KeyboardInterrupt) keeps it for resume.
    `identity` names what else the output depends on (source files, options): a change restarts from zero.
    """

    def __init__(
        self,
        out: Path,
        arch: str,
        kv: Iterable[KeyValue],
        specs: list[TensorSpec],
        *,
        split_max_size: int = 0,
        identity: Any = None,
    ) -> None:
        self.out = Path(out)
        self.tmp = temp_dir_for(self.out)
        self._order = [s.name for s in specs]
        self._nbytes = {s.name: s.nbytes for s in specs}
        self._current: tuple[str, BinaryIO, int, int, int] | None = None  # name, file, start, bytes, crc
        self._files: list[BinaryIO] = []
        self.resumed: list[Written] = []
        self._count = 0  # tensors begun in this run
        kv = list(kv)
        self._identity = {"format": JOURNAL_FORMAT, "set": set_id(kv, specs), "split": split_max_size, "id": identity}
        try:
            previous = self._load_journal()
            if not previous:
                shutil.rmtree(self.tmp, ignore_errors=True)  # left by a killed run with other inputs
            _no_link(self.tmp)
            self.tmp.mkdir(parents=True, exist_ok=True)
            headers = self._write_headers(arch, kv, specs, split_max_size)
            self._open(headers, previous)
        except KeyboardInterrupt:  # e.g. while re-reading a long partial output: keep it
            self.close()
            raise
        except BaseException:
            self.abort()
            raise

    def _load_journal(self) -> list[Written]:
        try:
            lines = (self.tmp / JOURNAL).read_text(encoding="utf-8").splitlines()
            if not lines or json.loads(lines[0]) != self._identity:
                return []
            return [Written(**json.loads(line)) for line in lines[1:] if line.endswith("}")]
        except (OSError, ValueError, TypeError):
            return []

    def _write_headers(self, arch: str, kv: list[KeyValue], specs: list[TensorSpec], split_max_size: int) -> list[Path]:
        """Header + key/values + tensor infos of every shard, in a side folder; returns their paths."""
        folder = self.tmp / "headers"
        _no_link(folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        writer = _Writer(folder / self.out.name, arch, split_max_size=split_max_size)
        writer.set_id = self._identity["set"]
        for key, value, vtype, sub_type in kv:
            if key != ARCHITECTURE:
                writer.add_key_value(key, value, vtype, sub_type)
        for spec in specs:
            writer.add_tensor_info(
                spec.name, tuple(reversed(spec.ne)), np.dtype(np.float32), spec.nbytes, spec.ggml_type
            )
        self._shard_of = {name: i for i, shard in enumerate(writer.tensors) for name in shard}
        self.paths = output_paths(self.out, len(writer.tensors))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return writer.format_shard_names(folder / self.out.name)

    def _open(self, headers: list[Path], previous: list[Written]) -> None:
        """Open the data files: resumed ones cut after the last verified tensor, fresh ones from the header."""
        data = [self.tmp / h.name for h in headers]
        sizes = [h.stat().st_size for h in headers]
        kept = self._verified(headers, data, previous)
        ends = list(sizes)
        for w in kept:
            ends[w.shard] = w.end
        for header, path, end in zip(headers, data, ends, strict=True):
            if not kept:
                os.replace(header, path)
            f = _open_own(path, "r+b")
            self._files.append(f)
            f.truncate(end)
            f.seek(end)
        shutil.rmtree(self.tmp / "headers", ignore_errors=True)
        self.resumed = kept
        with _open_own(self.tmp / JOURNAL, "w") as journal:
            journal.writelines(json.dumps(line) + "\n" for line in [self._identity, *map(asdict, kept)])
        self._journal = _open_own(self.tmp / JOURNAL, "a")

    def _verified(self, headers: list[Path], data: list[Path], previous: list[Written]) -> list[Written]:
        """The journaled tensors still intact on disk, in order: same headers, same places, same checksums."""
        if not previous:
            return []
        for header, path in zip(headers, data, strict=True):
            expected = header.read_bytes()
            if path.is_symlink() or not path.is_file():  # a planted link: start over (os.replace drops it)
                return []
            with _open_own(path, "rb") as f:
                if f.read(len(expected)) != expected:
                    return []
        kept: list[Written] = []
        fds = [os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC) for p in data]
        try:
            for i, w in enumerate(previous):
                if i >= len(self._order) or w.name != self._order[i] or w.shard != self._shard_of[w.name]:
                    break
                if _crc(fds[w.shard], w.start, self._nbytes[w.name]) != w.crc:
                    break
                kept.append(w)
        finally:
            for fd in fds:
                os.close(fd)
        return kept

    @property
    def _next(self) -> int:
        return len(self.resumed) + self._count

    def begin(self, name: str) -> None:
        """Start the next tensor, which must be the next one declared."""
        if self._current is not None:
            self.finish()
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            raise ValueError(f"tensor {name} written out of the declared order (expected {expected})")
        self._count += 1
        fout = self._files[self._shard_of[name]]
        fout.write(b"\0" * (-fout.tell() % ALIGNMENT))
        self._current = (name, fout, fout.tell(), 0, 0)

    def append(self, data: np.ndarray) -> None:
        """Append bytes of the current tensor (any dtype; written as stored, little-endian)."""
        if self._current is None:
            raise ValueError("append() before begin()")
        name, fout, start, done, crc = self._current
        data = np.ascontiguousarray(data)
        if done + data.nbytes > self._nbytes[name]:
            raise ValueError(f"tensor {name}: more than its {self._nbytes[name]} declared bytes")
        view = memoryview(data).cast("B")
        fout.write(view)
        self._current = (name, fout, start, done + data.nbytes, zlib.crc32(view, crc))

    def finish(self, record: Any = None) -> None:
        """End the current tensor and journal it with `record` (JSON), which `resumed` gives back next time."""
        if self._current is None:
            raise ValueError("finish() before begin()")
        name, fout, start, done, crc = self._current
        if done != self._nbytes[name]:
            raise ValueError(f"tensor {name}: wrote {done} bytes, expected {self._nbytes[name]}")
        fout.write(b"\0" * (-done % ALIGNMENT))
        fout.flush()  # in the kernel before the journal says so; the checksum covers what a power cut loses
        self._current = None
        written = Written(name, self._shard_of[name], start, fout.tell(), crc, record)
        self._journal.write(json.dumps(asdict(written)) + "\n")
        self._journal.flush()

    def patch(self, marker: bytes, replacement: bytes) -> None:
        """Overwrite a same-length placeholder in the first shard's header (for values known only at the end)."""
        if len(marker) != len(replacement):
            raise ValueError("a header patch must keep the length")
        fout = self._files[0]
        fout.flush()
        head = os.pread(fout.fileno(), 1 << 24, 0)
        at = head.find(marker)
        if at < 0:
            raise ValueError("placeholder not found in the GGUF header")
        os.pwrite(fout.fileno(), replacement, at)

    def commit(self, *, extra: dict[Path, Path] | None = None) -> list[Path]:
        """Close all shards and move them (and `extra` files written in `tmp`) under their final names."""
        if self._current is not None:
            self.finish()
        if self._next != len(self._order):
            raise ValueError(f"tensor {self._order[self._next]} was never written")
        for fout in self._files:
            fout.flush()
            os.fsync(fout.fileno())
            fout.close()
        self._journal.close()
        moves = [(self.tmp / p.name, p) for p in self.paths]
        if len(moves) > 1:  # first shard last: until it is in place the set cannot be opened
            self.paths[0].unlink(missing_ok=True)
            moves = moves[1:] + moves[:1]
        for src, dst in [*moves, *(extra or {}).items()]:
            os.replace(src, dst)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.paths

    def close(self) -> None:
        """Close the files without removing anything (what an interrupt leaves for the next run to resume)."""
        for f in [*self._files, getattr(self, "_journal", None)]:
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()  # a flush into a full disk fails; the descriptor is closed all the same

    def abort(self) -> None:
        """Remove everything written; never raises (it runs while another error, often ENOSPC, propagates)."""
        self.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StreamingGGUF:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.close()
        elif exc_type is not None:
            self.abort()
