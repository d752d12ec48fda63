"""An importance matrix: per weight tensor, the per-column sum of x² of the activations that entered its matmul and
how many rows (tokens) did, per matrix: per routed expert for the stacked expert tensors, per group for the grouped
output projection (`attn_output_a`, whose groups see different inputs), else one.

The quantizers take `importance(name)`: mean x² per column, [matrices, columns]. A matrix that fewer than `floor`
tokens reached is not skipped and not trusted alone: its sums are topped up with the layer's mean (the tensor's
token-weighted mean over all its matrices) as if the missing tokens had it, so an expert no token reached gets the
layer's mean. Stored as GGUF (tensors `<name>.in_sum2` and `<name>.counts`, llama.cpp's imatrix layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quant.errors import CheckpointError
from quant.gguf_keys import (
    IMATRIX_CHUNK_COUNT,
    IMATRIX_CHUNK_SIZE,
    IMATRIX_DATASETS,
    IMATRIX_FLOOR,
    IMATRIX_MODEL,
    IMATRIX_TOKENS,
    IMATRIX_TYPE,
)

FLOOR = 16  # tokens an expert needs before its own statistics stand alone
SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    """Sums of x² [matrices, columns] (float64) and token counts [matrices] per GGUF weight tensor name."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0
    chunks: int = 0
    chunk_size: int = 0
    dataset: str = ""
    model: str = ""
    floor: int = FLOOR

    def add(self, name: str, n_mat: int, mat: np.ndarray, rows: np.ndarray) -> None:
        """Rows [n, columns] of activations that entered matrix `mat[i]` of tensor `name` (of `n_mat`)."""
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, rows.shape[1]), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        sq = rows.astype(np.float64) ** 2
        np.add.at(self.sums[name], mat, sq)
        np.add.at(self.counts[name], mat, 1)

    def importance(self, name: str) -> np.ndarray | None:
        """Mean x² per column [matrices, columns] (float32), low-count matrices topped up with the layer mean;
        None when no token reached the tensor at all."""
        if name not in self.sums or not self.counts[name].sum():
            return None
        sums, counts = self.sums[name], self.counts[name]
        layer_mean = sums.sum(axis=0) / counts.sum()
        missing = np.maximum(self.floor - counts, 0)
        filled = sums + missing[:, None] * layer_mean[None, :]
        return (filled / np.maximum(counts + missing, 1)[:, None]).astype(np.float32) + np.float32(1e-12)

    def below_floor(self, name: str) -> list[int]:
        """Matrices of `name` that fewer than `floor` tokens reached (their statistic leans on the layer mean)."""
        return [int(i) for i in np.flatnonzero(self.counts[name] < self.floor)] if name in self.counts else []


def save_imatrix(imatrix: Imatrix, path: Path) -> None:
    """Write `imatrix` as an imatrix GGUF (via a temporary name, then rename)."""
    import gguf

    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="", endianess=gguf.GGUFEndian.LITTLE)
    writer.add_type(IMATRIX_TYPE)
    writer.add_array(IMATRIX_DATASETS, [imatrix.dataset])
    writer.add_uint32(IMATRIX_CHUNK_COUNT, imatrix.chunks)
    writer.add_uint32(IMATRIX_CHUNK_SIZE, imatrix.chunk_size)
    writer.add_uint32(IMATRIX_TOKENS, imatrix.tokens)
    writer.add_uint32(IMATRIX_FLOOR, imatrix.floor)
    writer.add_string(IMATRIX_MODEL, imatrix.model)
    for name in sorted(imatrix.sums):
        writer.add_tensor(name + SUMS, imatrix.sums[name].astype(np.float32))
        writer.add_tensor(name + COUNTS, imatrix.counts[name].astype(np.float32)[:, None])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)


def load_imatrix(path: Path) -> Imatrix:
    """Read an imatrix GGUF written by `save`; a file that is not one raises CheckpointError naming it."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--imatrix {path}: not a readable imatrix GGUF ({e})") from e

    def field_value(key: str, default: object = None) -> object:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    if field_value("general.type") != IMATRIX_TYPE:
        raise CheckpointError(f"--imatrix {path}: not an imatrix GGUF", hint="make one with `dsv4 imatrix MODEL`")
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    out = Imatrix(
        tokens=int(field_value(IMATRIX_TOKENS, 0)),
        chunks=int(field_value(IMATRIX_CHUNK_COUNT, 0)),
        chunk_size=int(field_value(IMATRIX_CHUNK_SIZE, 0)),
        dataset=str((field_value(IMATRIX_DATASETS, [""]) or [""])[0]),
        model=str(field_value(IMATRIX_MODEL, "")),
        floor=int(field_value(IMATRIX_FLOOR, FLOOR)),
    )
    for key, data in tensors.items():
        if key.endswith(SUMS):
            name = key[: -len(SUMS)]
            out.sums[name] = data.astype(np.float64).reshape(-1, data.shape[-1])
            out.counts[name] = tensors[name + COUNTS].reshape(-1).astype(np.int64)
    return out
