"""Routed experts -> 4-bit ggml blocks, one expert at a time, never sharing a scale between experts.

FP4 checkpoints repack to MXFP4 as a pure nibble permutation (docs/formats.md §Quantization types), so the result is
byte-for-byte the released weights. Everything else (FP8 experts of the -Base releases, BF16 fine-tunes, or a
non-MXFP4 target) is quantized by a search per expert: besides the plain quantizer's output, each block tries
other scales (a smaller one that clips the block's largest values, a larger one that does not clip), and the
choice with the lowest squared error is kept, so the expert's reconstruction error is minimised block by block
with the choice folded into the blocks' own scales (the deepseek4 graph ignores separate `.scale` tensors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from quant.quantizers import dequantize, ggml_quantize, quantize
from quant.recipes import BY_TYPE

T = GGMLQuantizationType
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12], dtype=np.float32)  # ggml's doubled e2m1 magnitudes
MXFP4_MIDPOINTS = (KVALUES_MXFP4[1:] + KVALUES_MXFP4[:-1]) / 2
Q4_0_SCALE_GRID = (0.8, 0.85, 0.9, 0.95, 1.05, 1.1)  # d = c * max / -8 candidates besides c = 1 (plain)
MXFP4_EXPONENT_STEPS = (-1, 1)  # E8M0 exponent offsets tried besides the plain one


@dataclass(frozen=True)
class ExpertResult:
    """One expert projection: its ggml bytes [out, row_bytes] and errors against the source values."""

    data: np.ndarray
    rms: float
    max_abs: float
    plain_rms: float


def repack_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Checkpoint FP4 [out, in/2] + E8M0 [out, in/32] -> ggml block_mxfp4 bytes [out, in/32 * 17], lossless.

    The checkpoint pairs neighbours (2j low nibble, 2j+1 high); ggml pairs j with j+16 inside each 32-block.
    So ggml byte 2j takes the low nibbles of source bytes j and j+8, byte 2j+1 their high nibbles. The 16 bytes
    of a block are worked on as two little-endian uint64 words, which is ~1.7x faster than per-nibble arrays.
    """
    rows = packed.shape[0]
    words = np.ascontiguousarray(packed).view(np.uint8).reshape(rows, -1, 16).view(np.uint64)
    first, second = words[..., 0], words[..., 1]
    even = (first & _LOW_NIBBLES) | ((second & _LOW_NIBBLES) << np.uint64(4))
    odd = ((first >> np.uint64(4)) & _LOW_NIBBLES) | (second & ~_LOW_NIBBLES)
    body = np.empty(words.shape, dtype=np.uint64)
    body[..., 0] = _spread_bytes(even & _LOW_WORD) | (_spread_bytes(odd & _LOW_WORD) << np.uint64(8))
    body[..., 1] = _spread_bytes(even >> np.uint64(32)) | (_spread_bytes(odd >> np.uint64(32)) << np.uint64(8))
    out = np.empty((rows, words.shape[1], 17), dtype=np.uint8)
    out[:, :, 0] = scale.view(np.uint8)
    out[:, :, 1:] = body.view(np.uint8)
    return out.reshape(rows, -1)


_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_LOW_WORD = np.uint64(0xFFFFFFFF)


def _spread_bytes(x: np.ndarray) -> np.ndarray:
    """Move the 4 bytes of the low 32 bits to the even byte positions of 64 bits (byte interleave)."""
    x = (x | (x << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    return (x | (x << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)


def _mxfp4(blocks: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 32] blocks as block_mxfp4 with E8M0 bytes `e` (nearest code, ties to the smaller magnitude).

    Returns the bytes and the values ggml decodes from them (kvalue * 2^(e - 128)).
    """
    half = np.ldexp(np.float32(1.0), e.astype(np.int32) - 128).astype(np.float32)[:, None]
    magnitude = np.searchsorted(MXFP4_MIDPOINTS, np.abs(blocks) / half, side="left").astype(np.uint8)
    negative = (blocks < 0) & (magnitude > 0)
    recon = np.where(negative, -KVALUES_MXFP4[magnitude], KVALUES_MXFP4[magnitude]) * half
    code = magnitude | (negative.astype(np.uint8) << 3)
    out = np.empty((blocks.shape[0], 17), dtype=np.uint8)
    out[:, 0] = e
    out[:, 1:] = code[:, :16] | (code[:, 16:] << 4)
    return out, recon


def _q4_0(blocks: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """[n, 32] blocks as block_q4_0 with d = c * max / -8 (c = 1 is ggml's choice), rounded the way ggml rounds.

    Returns the bytes and the values ggml decodes from them ((q - 8) * f16(d)).
    """
    imax = np.abs(blocks).argmax(axis=-1, keepdims=True)
    d = np.take_along_axis(blocks, imax, axis=-1) * np.float32(c) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d).astype(np.float32)
    q = np.trunc(blocks * inv + np.float32(8.5)).clip(0, 15).astype(np.uint8)
    d16 = d.astype(np.float16)
    out = np.empty((blocks.shape[0], 18), dtype=np.uint8)
    out[:, :2] = d16.view(np.uint8)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out, (q.astype(np.float32) - 8) * d16.astype(np.float32)


def _candidates(blocks: np.ndarray, ggml_type: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encodings of every block, the plain quantizer's choice first."""
    if ggml_type == T.MXFP4:
        amax = np.abs(blocks).max(axis=1)
        with np.errstate(divide="ignore"):
            e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0)
        for step in (0, *MXFP4_EXPONENT_STEPS):
            yield _mxfp4(blocks, np.clip(e + step, 0, 254).astype(np.uint8))
    else:
        for c in (1.0, *Q4_0_SCALE_GRID):
            yield _q4_0(blocks, c)


def quantize_expert(x: np.ndarray, ggml_type: int, importance: np.ndarray | None = None) -> ExpertResult:
    """Quantize one expert's [out, in] float32 weights the way its recipe says (`Recipe.expert_search`).

    `importance`: this expert's per-column mean x² of its input activations (an importance matrix,
    `quant.imatrix`); with it every ggml-quantized type is searched under it instead of the weights' own x².
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    recipe = BY_TYPE.get(ggml_type)
    search = recipe.expert_search if recipe else "plain"
    if importance is not None and recipe and recipe.quantizer == "ggml" and search != "scale":
        # ggml's quantizer weighted by the activations alone: per row the better of it and the unweighted one
        # (as without an imatrix) lowered the weighted error by at most 0.03 % on bench/fit.py's model, at twice
        # the time
        return _plain(x, ggml_type, importance)
    if recipe and recipe.needs_imatrix:
        raise ValueError(f"{recipe.name} needs an importance matrix")
    if search == "imatrix":
        return _best_of_two(x, ggml_type, np.mean(x * x, axis=0) + 1e-12)
    if search != "scale":
        return _plain(x, ggml_type)
    blocks = x.reshape(-1, 32)
    candidates = _candidates(blocks, ggml_type)
    best, recon = next(candidates)  # every candidate is a fresh array, so updating these in place is safe
    best_err = ((recon - blocks) ** 2).sum(axis=1)
    plain_sse = float(best_err.sum(dtype=np.float64))
    for data, candidate in candidates:
        err = ((candidate - blocks) ** 2).sum(axis=1)
        better = err < best_err
        best[better], recon[better], best_err[better] = data[better], candidate[better], err[better]
    return ExpertResult(
        data=best.reshape(x.shape[0], -1),
        rms=float(np.sqrt(best_err.sum(dtype=np.float64) / x.size)),
        max_abs=float(np.abs(recon - blocks).max()),
        plain_rms=float(np.sqrt(plain_sse / x.size)),
    )


def _plain(x: np.ndarray, ggml_type: int, importance: np.ndarray | None = None) -> ExpertResult:
    """The quantizer as it is, weighted by `importance` if given: types without a search (the Q8_0/BF16 fallbacks of
    rows that fit no 4-bit block), and every ggml type under an importance matrix."""
    data = quantize(x, ggml_type, imatrix=importance)
    diff = dequantize(data, ggml_type).reshape(x.shape) - x
    rms = float(np.sqrt(np.mean(diff.astype(np.float64) ** 2))) if x.size else 0.0
    max_abs = float(np.abs(diff).max()) if x.size else 0.0
    return ExpertResult(data=data.reshape(x.shape[0], -1), rms=rms, max_abs=max_abs, plain_rms=rms)


def _best_of_two(x: np.ndarray, ggml_type: int, weights: np.ndarray) -> ExpertResult:
    """ggml's own quantizer, row by row the better (lower squared error) of unweighted and weighted by `weights`."""
    plain = ggml_quantize(x, ggml_type)
    weighted = ggml_quantize(x, ggml_type, imatrix=weights)
    plain_diff = dequantize(plain, ggml_type).reshape(x.shape) - x
    weighted_diff = dequantize(weighted, ggml_type).reshape(x.shape) - x
    plain_sq, weighted_sq = plain_diff**2, weighted_diff**2
    better = weighted_sq.sum(axis=1) < plain_sq.sum(axis=1)
    best = np.where(better[:, None], weighted, plain)
    diff = np.where(better[:, None], weighted_diff, plain_diff)
    sse = np.where(better, weighted_sq.sum(axis=1), plain_sq.sum(axis=1)).sum(dtype=np.float64)
    return ExpertResult(
        data=best,
        rms=float(np.sqrt(sse / x.size)),
        max_abs=float(np.abs(diff).max()),
        plain_rms=float(np.sqrt(plain_sq.sum(dtype=np.float64) / x.size)),
    )
