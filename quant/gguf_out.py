"""A streaming GGUF writer: tensor data is appended piece by piece, so no tensor (let alone the model) is held.

Built on gguf.GGUFWriter for the header, key/values, tensor infos and split naming/keys (`split.no`,
`split.count`, `split.tensors.count`, `-0000X-of-0000N.gguf`, what llama.cpp's loader expects). Files are written
in a hidden temporary folder next to the output and moved under their final names only when every shard is
complete; on any error or interrupt the folder is removed, and a folder left by a killed run is removed by the
next run, so a final name never holds a partial file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
from gguf import GGUFWriter

from quant.mapping import KeyValue, TensorSpec

ALIGNMENT = 32  # GGUF default data alignment


def temp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def output_paths(out: Path, n_shards: int) -> list[Path]:
    """Final file names: `out` itself, or `<stem>-0000X-of-0000N.gguf` shards."""
    if n_shards == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i + 1:05d}-of-{n_shards:05d}.gguf") for i in range(n_shards)]


class StreamingGGUF:
    """`with StreamingGGUF(out, arch, kv, specs) as w:` then, in spec order, `w.begin(name)` and `w.append(bytes)`
    per piece, then `w.commit()` to move the files under their final names; an error in the block removes them."""

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
        try:
            self._start(arch, kv, specs, split_max_size)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self._current: tuple[str, BinaryIO, int] | None = None

    def _start(self, arch: str, kv: Iterable[KeyValue], specs: list[TensorSpec], split_max_size: int) -> None:
        self._writer = GGUFWriter(self.tmp / self.out.name, arch, split_max_size=split_max_size)
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

    def begin(self, name: str) -> None:
        self._finish_current()
        fout = self._writer.fout[self._shard_of[name]]
        fout.write(b"\0" * (-fout.tell() % ALIGNMENT))
        self._current = (name, fout, 0)

    def append(self, data: np.ndarray) -> None:
        """Append bytes of the current tensor (any dtype; written as stored, little-endian)."""
        assert self._current is not None
        name, fout, done = self._current
        data = np.ascontiguousarray(data)
        fout.write(memoryview(data).cast("B"))
        self._current = (name, fout, done + data.nbytes)

    def patch(self, marker: bytes, replacement: bytes) -> None:
        """Overwrite a same-length placeholder in the first shard's header (for values known only at the end)."""
        if len(marker) != len(replacement):
            raise ValueError("a header patch must keep the length")
        fout = self._writer.fout[0]
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
            raise RuntimeError(f"tensor {name}: wrote {done} bytes, expected {self._nbytes[name]}")
        fout.write(b"\0" * (-done % ALIGNMENT))
        self._current = None

    def commit(self, *, extra: dict[Path, Path] | None = None) -> list[Path]:
        """Close all shards and move them (and `extra` files written in `tmp`) under their final names."""
        self._finish_current()
        self._writer.close()
        written = self._writer.format_shard_names(self.tmp / self.out.name)
        for src, dst in [*zip(written, self.paths, strict=True), *(extra or {}).items()]:
            os.replace(src, dst)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.paths

    def abort(self) -> None:
        for fout in self._writer.fout or []:
            fout.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StreamingGGUF:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
