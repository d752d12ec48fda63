"""The reference's log-probabilities, computed once per (reference files, text, context, chunks) and reused.

They are llama-perplexity's `--kl-divergence-base` file (tools/perplexity/perplexity.cpp): "_logits_", n_ctx,
n_vocab, n_chunk, the chunk tokens, then for every chunk the second half's tokens each as 2·⌈n_vocab/2⌉ + 4 uint16.
Its size is therefore known before it is written: printed and checked against free disk. The file is written
under a temporary name and renamed once llama-perplexity finished; a JSON beside it, written last, holds its size
and CRC-32. A file without that record, of another size or CRC, or with another header is damaged or partial
and is computed again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.atomic import write_text_atomic
from dsv4cli.errors import DiskSpaceError
from dsv4cli.eval.perplexity import PerplexityError
from dsv4cli.home import dsv4_home
from dsv4cli.units import human_bytes

MAGIC = b"_logits_"
HEADER = struct.Struct("<8sIii")  # magic, n_ctx, n_vocab, n_chunk
LOCK = ".lock"


@dataclass(frozen=True)
class LogitsKey:
    """What the reference logits depend on."""

    ref_files: tuple[Path, ...]
    text_sha256: str
    ctx: int
    chunks: int
    n_vocab: int

    def digest(self) -> str:
        """Files by path, size and modification time (hashing a 150 GB model on every run would cost minutes)."""
        h = hashlib.sha256()
        for f in self.ref_files:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        h.update(f"{self.text_sha256}\0{self.ctx}\0{self.chunks}\0{self.n_vocab}".encode())
        return h.hexdigest()[:24]


@dataclass(frozen=True)
class CachedLogits:
    path: Path
    reused: bool


def cache_dir() -> Path:
    return dsv4_home() / "eval" / "logits"


def expected_bytes(ctx: int, chunks: int, n_vocab: int) -> int:
    """The exact size llama-perplexity writes for these settings."""
    per_token = 2 * (2 * ((n_vocab + 1) // 2) + 4)
    return HEADER.size + 4 * ctx * chunks + chunks * (ctx - 1 - ctx // 2) * per_token


def _crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def _valid(path: Path, meta_path: Path, key: LogitsKey) -> dict | None:
    """The record of a complete, undamaged cache file, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        size = path.stat().st_size
        with path.open("rb") as f:
            header = HEADER.unpack(f.read(HEADER.size))
    except (OSError, ValueError, struct.error):
        return None
    want = expected_bytes(key.ctx, key.chunks, key.n_vocab)
    if header != (MAGIC, key.ctx, key.n_vocab, key.chunks) or size != want or meta.get("bytes") != want:
        return None
    return meta if meta.get("crc32") == _crc(path) else None


def reference_logits(key: LogitsKey, compute: Callable[[Path], None], *, note: Callable[[str], None]) -> CachedLogits:
    """The cached logits for `key`, or `compute(tmp_path)` (it runs llama-perplexity to write them there) after the
    size and free-disk check. Ctrl-C while computing leaves no file under the final name."""
    from dsv4cli.hub.safe_paths import folder_lock

    folder = cache_dir()
    name = key.digest()
    path, meta_path = folder / f"{name}.bin", folder / f"{name}.json"
    with folder_lock(folder, LOCK, what="`dsv4 eval`", on_wait=note):
        if path.exists() or meta_path.exists():
            meta = _valid(path, meta_path, key)
            if meta is not None:
                note(f"reference logits: reusing {path} ({human_bytes(meta['bytes'])})")
                return CachedLogits(path, reused=True)
            note(f"reference logits in {path} are partial or damaged; computing them again")
            meta_path.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        size = expected_bytes(key.ctx, key.chunks, key.n_vocab)
        free = shutil.disk_usage(folder).free
        note(f"reference logits: {human_bytes(size)} ({key.n_vocab:,}-token vocabulary) -> {path}")
        if size > free:
            raise DiskSpaceError(
                f"not enough free disk in {folder} for the reference logits: {human_bytes(size)} needed, "
                f"{human_bytes(free)} free",
                hint="free some space, or lower --chunks or --ctx",
            )
        tmp = folder / f"{name}.bin.partial"
        try:
            compute(tmp)
            written = tmp.stat().st_size if tmp.exists() else 0
            if written != size:
                raise PerplexityError(
                    f"llama-perplexity wrote {written} bytes of reference logits, {size} expected (log in "
                    f"{dsv4_home() / 'logs'})"
                )
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        meta = {"bytes": size, "crc32": _crc(path), "ctx": key.ctx, "chunks": key.chunks, "n_vocab": key.n_vocab,
                "ref": [str(f) for f in key.ref_files], "text_sha256": key.text_sha256}  # fmt: skip
        write_text_atomic(meta_path, json.dumps(meta, indent=2))
        return CachedLogits(path, reused=False)
