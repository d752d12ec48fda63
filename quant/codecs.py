"""Vectorised numpy codecs for the dtypes DeepSeek V4 ships: FP8 e4m3, E8M0 scales, packed FP4 e2m1, BF16.

Decoders are table lookups (one fancy index per tensor) so a multi-GB shard streams at memory speed without
torch. The encoders exist to write test checkpoints in the released formats (docs/formats.md §Encodings).
"""

from __future__ import annotations

import numpy as np

from quant.errors import CheckpointError

Block = int | tuple[int, int]
FP8_MAX = 448.0
FP4_MAX = 6.0


def _e8m0_table() -> np.ndarray:
    table = np.full(256, np.nan, dtype=np.float32)
    table[:255] = np.ldexp(1.0, np.arange(255) - 127)
    return table


def _fp8_e4m3_table() -> np.ndarray:
    code = np.arange(256)
    sign = np.where(code & 0x80, -1.0, 1.0)
    exponent, mantissa = (code >> 3) & 0x0F, code & 0x07
    magnitude = np.where(exponent == 0, np.ldexp(mantissa / 8.0, -6), np.ldexp(1.0 + mantissa / 8.0, exponent - 7))
    table = (sign * magnitude).astype(np.float32)
    table[(code & 0x7F) == 0x7F] = np.nan
    return table


E8M0 = _e8m0_table()
FP8_E4M3 = _fp8_e4m3_table()
FP4_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
# byte -> (low-nibble value, high-nibble value): element 2j sits in the low nibble of byte j.
FP4_PAIRS = np.stack([FP4_E2M1[np.arange(256) & 0x0F], FP4_E2M1[np.arange(256) >> 4]], axis=1)


def _as_u8(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == np.uint8 else array.view(np.uint8)


def _block_shape(block: Block) -> tuple[int, int]:
    rows, cols = (block, block) if isinstance(block, int) else block
    if rows < 1 or cols < 1:
        raise ValueError(f"block sizes must be positive, got {block}")
    return rows, cols


def scale_grid(shape: tuple[int, ...], block: Block) -> tuple[int, int]:
    """Shape of the block-scale tensor of an [out, in] weight: ceil(out/rb) x ceil(in/cb) (partial blocks count)."""
    rows, cols = _block_shape(block)
    return -(-shape[0] // rows), -(-shape[1] // cols)


def e8m0_to_f32(scale_u8: np.ndarray) -> np.ndarray:
    """E8M0 byte b -> 2**(b - 127) (255 -> NaN)."""
    return E8M0[_as_u8(scale_u8)]


def fp8_e4m3_to_f32(weight_u8: np.ndarray) -> np.ndarray:
    """FP8 e4m3fn bytes -> float32, subnormals included; 0x7F/0xFF -> NaN."""
    return FP8_E4M3[_as_u8(weight_u8)]


def bf16_to_f32(bits_u16: np.ndarray) -> np.ndarray:
    """BF16 bit patterns -> float32 (exact: BF16 is the top half of an f32)."""
    return (np.asarray(bits_u16).astype(np.uint32) << 16).view(np.float32)


def dequant_fp8_block(weight_u8: np.ndarray, scale_u8: np.ndarray, block: Block, *, name: str = "weight") -> np.ndarray:
    """FP8 [out, in] times an E8M0 grid of [ceil(out/rb), ceil(in/cb)] block scales -> float32 [out, in].

    Ceil division matches the official model.py; the last row/column block is cropped, not padded.
    """
    rows, cols = _block_shape(block)
    weight = fp8_e4m3_to_f32(weight_u8)
    if weight.ndim != 2:
        raise CheckpointError(f"tensor '{name}': FP8 block weights must be 2-D, got shape {weight.shape}")
    out_dim, in_dim = weight.shape
    grid = scale_grid(weight.shape, block)
    if np.shape(scale_u8) != grid:
        raise CheckpointError(
            f"tensor '{name}': scale shape {np.shape(scale_u8)} does not match {grid} for weight "
            f"{weight.shape} with {rows}x{cols} blocks"
        )
    column_scales = np.repeat(e8m0_to_f32(scale_u8), cols, axis=1)[:, :in_dim]
    full = (out_dim // rows) * rows
    full_blocks = weight[:full].reshape(-1, rows, in_dim)
    full_blocks *= column_scales[: out_dim // rows, None, :]
    if full < out_dim:
        weight[full:] *= column_scales[-1]
    return weight


def fp4_e2m1_to_f32(packed_u8: np.ndarray, scale_u8: np.ndarray, *, name: str = "weight") -> np.ndarray:
    """Packed FP4 [out, in/2] (I8 or U8) with E8M0 [out, in/32] scales -> float32 [out, in]."""
    packed = _as_u8(packed_u8)
    if packed.ndim != 2:
        raise CheckpointError(f"tensor '{name}': packed FP4 weights must be 2-D, got shape {packed.shape}")
    out_dim, in_dim = packed.shape[0], packed.shape[1] * 2
    if in_dim % 32 or np.shape(scale_u8) != (out_dim, in_dim // 32):
        raise CheckpointError(
            f"tensor '{name}': scale shape {np.shape(scale_u8)} does not match {(out_dim, in_dim // 32)} "
            f"for packed FP4 weight {packed.shape} (one scale per 32 values)"
        )
    values = FP4_PAIRS[packed].reshape(out_dim, in_dim // 32, 32)
    values *= e8m0_to_f32(scale_u8)[:, :, None]
    return values.reshape(out_dim, in_dim)


# ---- encoders (test checkpoints) ----


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns, rounding to nearest even; NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _power_of_two_scales(amax: np.ndarray, limit: float) -> np.ndarray:
    """E8M0 byte of the smallest power of two s with amax / s <= limit (127, i.e. 1.0, for all-zero blocks)."""
    amax = amax.astype(np.float64)
    safe = np.where(amax > 0, amax, limit)
    exponent = np.ceil(np.log2(safe / limit)).astype(np.int64)
    exponent += safe > limit * np.ldexp(1.0, exponent)
    exponent -= safe <= limit * np.ldexp(1.0, exponent - 1)
    return np.clip(exponent + 127, 0, 254).astype(np.uint8)


def _encode_minifloat(
    x: np.ndarray, *, mantissa_bits: int, min_exponent: int, max_value: float, sign_bit: int
) -> np.ndarray:
    """Round to the nearest sign/exponent/mantissa code (ties to even, saturating); sign bit above the magnitude.

    Below the top of each binade the codes are evenly spaced: code = (e - min_exponent) * 2**mantissa_bits
    + rint(|x| / 2**(e - mantissa_bits)), with e the binade clamped at the subnormal range.
    """
    magnitude = np.minimum(np.abs(x), max_value)
    _, exponent = np.frexp(np.maximum(magnitude, np.ldexp(1.0, min_exponent)))
    exponent = exponent - 1
    steps = np.rint(np.ldexp(magnitude, mantissa_bits - exponent)).astype(np.int64)
    code = (exponent - min_exponent) * (1 << mantissa_bits) + steps
    return (code | np.where(x < 0, sign_bit, 0)).astype(np.uint8)


def quantize_fp8_block(x: np.ndarray, block: Block) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (FP8 e4m3 bytes [out, in], E8M0 scales [ceil(out/rb), ceil(in/cb)]).

    Each block's scale is the smallest power of two that brings its max magnitude within ±448.
    """
    rows, cols = _block_shape(block)
    x = np.asarray(x, dtype=np.float64)
    out_dim, in_dim = x.shape
    grid = scale_grid(x.shape, block)
    padded = np.zeros((grid[0] * rows, grid[1] * cols))
    padded[:out_dim, :in_dim] = np.abs(x)
    scale = _power_of_two_scales(padded.reshape(grid[0], rows, grid[1], cols).max(axis=(1, 3)), FP8_MAX)
    divisor = np.repeat(np.repeat(np.ldexp(1.0, scale.astype(np.int64) - 127), rows, 0), cols, 1)
    code = _encode_minifloat(
        x / divisor[:out_dim, :in_dim], mantissa_bits=3, min_exponent=-6, max_value=FP8_MAX, sign_bit=0x80
    )
    return code, scale


def quantize_fp4_e2m1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (packed FP4 bytes [out, in/2], E8M0 scales [out, in/32]); low nibble first."""
    x = np.asarray(x, dtype=np.float64)
    out_dim, in_dim = x.shape
    if in_dim % 32:
        raise ValueError(f"FP4 rows need a multiple of 32 values, got {in_dim}")
    groups = x.reshape(out_dim, in_dim // 32, 32)
    scale = _power_of_two_scales(np.abs(groups).max(axis=2), FP4_MAX)
    scaled = groups / np.ldexp(1.0, scale.astype(np.int64) - 127)[:, :, None]
    code = _encode_minifloat(
        scaled.reshape(out_dim, in_dim), mantissa_bits=1, min_exponent=0, max_value=FP4_MAX, sign_bit=0x8
    )
    return (code[:, 0::2] | (code[:, 1::2] << 4)).astype(np.uint8), scale
