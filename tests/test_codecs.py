"""Codecs against slow scalar references written from the bit layouts in docs/formats.md §Encodings."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from quant.codecs import (
    bf16_to_f32,
    dequant_fp8_block,
    e8m0_to_f32,
    f32_to_bf16,
    fp4_e2m1_to_f32,
    fp8_e4m3_to_f32,
    quantize_fp4_e2m1,
    quantize_fp8_block,
)
from quant.errors import CheckpointError


def ref_fp8(code: int) -> float:
    """e4m3fn: bit 7 sign, bits 6-3 exponent (bias 7), bits 2-0 mantissa; S.1111.111 is NaN; no infinities."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * (mantissa / 8) * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def ref_e8m0(byte: int) -> float:
    return math.nan if byte == 255 else 2.0 ** (byte - 127)


def ref_fp4(nibble: int) -> float:
    """e2m1: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; exponent 0 is subnormal (0.5 * m)."""
    sign = -1.0 if nibble & 0x8 else 1.0
    exponent, mantissa = (nibble >> 1) & 0x3, nibble & 0x1
    if exponent == 0:
        return sign * 0.5 * mantissa
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)


def ref_bf16(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def ref_f32_to_bf16(value: float) -> int:
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    if math.isnan(value):
        return 0x7FC0
    upper, lower = bits >> 16, bits & 0xFFFF
    if lower > 0x8000 or (lower == 0x8000 and upper & 1):
        upper += 1
    return upper


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def test_fp8_all_256_codes_match_the_bit_layout():
    decoded = fp8_e4m3_to_f32(np.arange(256, dtype=np.uint8))
    assert decoded.dtype == np.float32
    for code in range(256):
        assert same(float(decoded[code]), ref_fp8(code)), hex(code)
    assert decoded[0x7E] == 448 and decoded[0xFE] == -448
    assert decoded[0x01] == 2.0**-9  # smallest subnormal
    assert decoded[0x38] == 1.0
    assert np.isnan(decoded[[0x7F, 0xFF]]).all()
    assert np.isfinite(np.delete(decoded, [0x7F, 0xFF])).all()


def test_e8m0_all_256_bytes():
    decoded = e8m0_to_f32(np.arange(256, dtype=np.uint8))
    for byte in range(256):
        assert same(float(decoded[byte]), ref_e8m0(byte)), byte
    assert decoded[127] == 1.0


def test_fp4_all_16_codes_and_the_published_table():
    table = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert [ref_fp4(n) for n in range(8)] == table
    assert [ref_fp4(n) for n in range(8, 16)] == [-v for v in table]
    # one row of 32 values with scale 1.0: bytes 0x10*hi + lo hold (lo, hi)
    packed = np.array([[(n + 1) % 16 << 4 | n for n in range(16)]], dtype=np.uint8)
    decoded = fp4_e2m1_to_f32(packed, np.array([[127]], dtype=np.uint8))
    assert decoded.shape == (1, 32)
    for j in range(16):
        assert same(float(decoded[0, 2 * j]), ref_fp4(j)), j
        assert same(float(decoded[0, 2 * j + 1]), ref_fp4((j + 1) % 16)), j


def test_bf16_all_65536_patterns():
    decoded = bf16_to_f32(np.arange(65536, dtype=np.uint16))
    reference = np.array([ref_bf16(b) for b in range(65536)], dtype=np.float32)
    nan = np.isnan(reference)  # Python floats quieten signalling NaNs, so compare those as NaN only
    assert np.array_equal(np.isnan(decoded), nan)
    assert np.array_equal(decoded[~nan].view(np.uint32), reference[~nan].view(np.uint32))


def test_fp4_dequant_with_scales_matches_scalar_loop():
    rng = np.random.default_rng(1)
    packed = rng.integers(0, 256, size=(3, 48), dtype=np.uint8).view(np.int8)  # stored as I8
    scale = rng.integers(120, 135, size=(3, 3), dtype=np.uint8)
    decoded = fp4_e2m1_to_f32(packed, scale)
    assert decoded.shape == (3, 96)
    raw = packed.view(np.uint8)
    for o in range(3):
        for i in range(96):
            byte = int(raw[o, i // 2])
            nibble = byte & 0xF if i % 2 == 0 else byte >> 4
            assert decoded[o, i] == np.float32(ref_fp4(nibble) * ref_e8m0(int(scale[o, i // 32])))


@pytest.mark.parametrize(("shape", "block"), [((130, 70), 128), ((33, 65), 32), ((64, 64), 32), ((5, 70), (1, 32))])
def test_fp8_block_dequant_matches_scalar_loop(shape, block):
    rows, cols = (block, block) if isinstance(block, int) else block
    grid = (-(-shape[0] // rows), -(-shape[1] // cols))
    rng = np.random.default_rng(2)
    weight = rng.integers(0, 256, size=shape, dtype=np.uint8)
    weight[weight & 0x7F == 0x7F] = 0x10  # keep NaN codes out so equality is meaningful
    scale = rng.integers(110, 140, size=grid, dtype=np.uint8)
    decoded = dequant_fp8_block(weight, scale, block)
    assert decoded.shape == shape and decoded.dtype == np.float32
    for o in range(shape[0]):
        for i in range(shape[1]):
            expected = ref_fp8(int(weight[o, i])) * ref_e8m0(int(scale[o // rows, i // cols]))
            assert decoded[o, i] == np.float32(expected), (o, i)


def test_dequant_rejects_scale_grids_that_do_not_fit():
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wkv\.weight.*\(2, 1\)"):
        dequant_fp8_block(
            np.zeros((130, 70), np.uint8), np.zeros((1, 1), np.uint8), 128, name="layers.0.attn.wkv.weight"
        )
    with pytest.raises(CheckpointError, match="one scale per 32"):
        fp4_e2m1_to_f32(np.zeros((4, 32), np.uint8), np.zeros((4, 1), np.uint8))


def test_f32_to_bf16_rounds_to_nearest_even():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, size=4000, dtype=np.uint64).astype(np.uint32)
    ties = (np.arange(64, dtype=np.uint32) << 16) | 0x3F800000 | 0x8000  # exact halfway cases, both parities
    values = np.concatenate([bits, ties]).view(np.float32)
    values = np.concatenate([values, np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38])])
    encoded = f32_to_bf16(values)
    assert encoded.dtype == np.uint16
    for value, got in zip(values.tolist(), encoded.tolist(), strict=True):
        if math.isnan(value):
            assert math.isnan(ref_bf16(got))
        else:
            assert got == ref_f32_to_bf16(value), value


def nearest_error(values: np.ndarray, grid: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Smallest possible |x - g * s| over every representable g (brute force)."""
    return np.abs(values[..., None] - grid * scales[..., None]).min(axis=-1)


def test_fp8_encoder_picks_power_of_two_scales_and_nearest_codes():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 0.02, size=(70, 100)).astype(np.float32)
    x[:32, :32] = 0  # an all-zero block
    x[40, 90] = 3.0  # an outlier in one block
    codes, scale = quantize_fp8_block(x, 32)
    assert codes.dtype == np.uint8 and scale.dtype == np.uint8 and scale.shape == (3, 4)
    assert not np.isin(codes, [0x7F, 0xFF]).any()
    decoded = dequant_fp8_block(codes, scale, 32)
    scales = np.array([[ref_e8m0(int(s)) for s in row] for row in scale])
    for bo in range(3):
        for bi in range(4):
            amax = np.abs(x[bo * 32 : bo * 32 + 32, bi * 32 : bi * 32 + 32]).max()
            if amax == 0:
                assert scale[bo, bi] == 127
            else:
                assert amax / scales[bo, bi] <= 448 < amax / (scales[bo, bi] / 2)
    finite = np.array([ref_fp8(c) for c in range(256) if c & 0x7F != 0x7F])
    per_element = np.repeat(np.repeat(scales, 32, 0), 32, 1)[:70, :100]
    assert np.allclose(np.abs(x - decoded), nearest_error(x, finite, per_element), rtol=0, atol=1e-12)


def test_fp4_encoder_packs_low_nibble_first_and_picks_nearest_codes():
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, :4] = [0.5, 6.0, -1.5, 3.0]  # amax 6 -> scale 1.0 (byte 127)
    packed, scale = quantize_fp4_e2m1(x)
    assert packed.shape == (1, 16) and scale.tolist() == [[127]]
    assert packed[0, 0] == 0x1 | 0x7 << 4 and packed[0, 1] == 0xB | 0x5 << 4
    rng = np.random.default_rng(5)
    x = rng.normal(0, 0.02, size=(8, 96)).astype(np.float32)
    packed, scale = quantize_fp4_e2m1(x)
    decoded = fp4_e2m1_to_f32(packed, scale)
    scales = np.repeat(np.array([[ref_e8m0(int(s)) for s in row] for row in scale]), 32, axis=1)
    amax = np.abs(x.reshape(8, 3, 32)).max(axis=2)
    assert (amax / scales[:, ::32] <= 6).all() and (amax / (scales[:, ::32] / 2) > 6).all()
    grid = np.array([ref_fp4(n) for n in range(16)])
    assert np.allclose(np.abs(x - decoded), nearest_error(x, grid, scales), rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", [128, 32])
def test_encoders_are_stable_under_round_trip(block):
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, size=(96, 160)).astype(np.float32)
    once = dequant_fp8_block(*quantize_fp8_block(x, block), block)
    assert np.array_equal(dequant_fp8_block(*quantize_fp8_block(once, block), block), once)
    assert np.abs(once - x).max() <= np.abs(x).max() / 16
    once = fp4_e2m1_to_f32(*quantize_fp4_e2m1(x))
    assert np.array_equal(fp4_e2m1_to_f32(*quantize_fp4_e2m1(once)), once)
    bf16 = bf16_to_f32(f32_to_bf16(x))
    assert np.array_equal(bf16_to_f32(f32_to_bf16(bf16)), bf16)
