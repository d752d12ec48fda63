"""Checkpoint tensors as float32 rows, decoding FP8 (block scales), FP4 (E8M0 scales) and BF16 by stored dtype.

Rows come from `Checkpoint.read` (pread into fresh buffers), so memory is bounded by the chunk being converted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from quant.codecs import bf16_to_f32, dequant_fp8_block, fp4_e2m1_to_f32, scale_grid
from quant.errors import CheckpointError
from quant.safetensors import Checkpoint, as_rows

CHUNK_BYTES = 32 << 20  # float32 working set per row chunk of a non-expert tensor


def scale_name(name: str) -> str:
    """The `.scale` companion of an FP8/FP4 weight."""
    return name[: -len(".weight")] + ".scale" if name.endswith(".weight") else name + ".scale"


SCALE_DTYPES = ("F8_E8M0", "F8_E8M0FNU", "U8")


def fp8_block(shape: tuple[int, ...], scale_shape: tuple[int, ...], block: int) -> tuple[int, int] | None:
    """The (rows, cols) block an FP8 weight's scale grid implies: square blocks, or per-row groups (Engram
    tables); None when the grid fits neither."""
    if len(shape) != 2 or len(scale_shape) != 2 or 0 in scale_shape:
        return None
    if scale_shape == scale_grid(shape, block):
        return (block, block)
    if scale_shape[0] == shape[0] and shape[1] % scale_shape[1] == 0:
        return (1, shape[1] // scale_shape[1])
    return None


def fp4_scale_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The E8M0 grid of a packed FP4 weight [out, in/2]: one scale per 32 values; None for other shapes."""
    if len(shape) != 2 or (2 * shape[1]) % 32:
        return None
    return (shape[0], 2 * shape[1] // 32)


class SourceTensors:
    """Float rows of checkpoint tensors, with the facts (FP8 block size, expert count) needed to decode them."""

    def __init__(self, ckpt: Checkpoint, facts: dict[str, Any]) -> None:
        self.ckpt = ckpt
        self.block = int(facts["weight_block_size"][0])
        self.n_experts = int(facts["n_routed_experts"])

    def nbytes(self, name: str) -> int:
        """Stored bytes of a tensor and its scale companion."""
        scale = scale_name(name)
        return self.ckpt.info(name).nbytes + (self.ckpt.info(scale).nbytes if scale in self.ckpt else 0)

    def rows(self, name: str) -> int:
        return as_rows(self.ckpt.info(name).shape)[0]

    def row_step(self, width: int) -> int:
        """Rows per chunk: ~CHUNK_BYTES of float32, a multiple of the FP8 block height."""
        step = max(1, CHUNK_BYTES // (4 * max(width, 1)))
        return max(self.block, step // self.block * self.block)

    def prefetch(self, names: tuple[str, ...]) -> None:
        for name in names:
            for part in (name, scale_name(name)):
                if part in self.ckpt:
                    self.ckpt.prefetch(part)

    def floats(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32."""
        info = self.ckpt.info(name)
        part = self.ckpt.read(name, start, stop)
        stop = start + part.shape[0]
        if info.dtype == "F8_E4M3":
            return self._fp8(name, part, start, stop, info.shape)
        if info.dtype == "I8" and scale_name(name) in self.ckpt:
            return fp4_e2m1_to_f32(part, self.ckpt.read(scale_name(name), start, stop), name=name)
        if info.dtype == "BF16":
            return bf16_to_f32(part)
        if info.dtype in ("F32", "F16", "F64"):
            return part.astype(np.float32)
        raise CheckpointError(f"{self.ckpt.path_of(name)}: tensor '{name}' has dtype {info.dtype}, expected a float")

    def _fp8(self, name: str, part: np.ndarray, start: int, stop: int, shape: tuple[int, ...]) -> np.ndarray:
        scale = scale_name(name)
        if scale not in self.ckpt:
            raise CheckpointError(f"{self.ckpt.path_of(name)}: FP8 tensor '{name}' has no '{scale}'")
        block = fp8_block(shape, self.ckpt.info(scale).shape, self.block)
        if block is None:
            raise CheckpointError(
                f"{self.ckpt.path_of(scale)}: tensor '{scale}' shape {self.ckpt.info(scale).shape} fits no block "
                f"grid of '{name}' {shape}"
            )
        grid = self.ckpt.read(scale, start // block[0], math.ceil(stop / block[0]))
        return dequant_fp8_block(part, grid, block, name=name)
