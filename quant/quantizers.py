"""float32 rows -> ggml block bytes, using existing quantizers only (no block math is re-derived here).

Which path a type takes is its `quantizer` in `quant.recipes`. Block types go through ggml's own
`ggml_quantize_chunk` in the libggml-base bundled with llama-cpp-python
(ctypes): for Q8_0/Q4_0/MXFP4 it writes the same bytes as the `gguf` package's numpy quantizers (the tests check
this) but 4-10x faster, which keeps conversion near disk speed; K-quants exist only there. BF16 comes from the
`gguf` package; F32 is a plain copy.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from quant.mapping import nbytes_of
from quant.recipes import BY_TYPE

T = GGMLQuantizationType


@functools.cache
def _libggml_base() -> ctypes.CDLL:
    """libggml-base from the installed llama_cpp package (found without importing llama_cpp)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama-cpp-python is not installed; K-quants need its bundled libggml-base")
    lib_dir = Path(spec.origin).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.so*")) + sorted(lib_dir.glob("libggml-base*.dylib"))
    if not candidates:
        raise RuntimeError(f"no libggml-base in {lib_dir}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """`struct ggml_type_traits` (ggml.h): only the row decoder is used."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


@functools.cache
def _to_float(ggml_type: int) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    traits = _libggml_base().ggml_get_type_traits(int(ggml_type)).contents
    if not traits.to_float:
        raise ValueError(f"ggml has no decoder for type {ggml_type}")
    return _ToFloat(traits.to_float)


def ggml_quantize(x: np.ndarray, ggml_type: int, *, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk over float32 rows [n, k] -> uint8 [n, row_bytes]; `imatrix` = per-column importance."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.empty((rows, nbytes_of((cols,), ggml_type)), dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = _libggml_base().ggml_quantize_chunk(
        int(ggml_type), x.ctypes.data, out.ctypes.data, 0, rows, cols, None if weights is None else weights.ctypes.data
    )
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def ggml_dequantize(data: np.ndarray, ggml_type: int, cols: int) -> np.ndarray:
    """ggml's own row decoder: uint8 [n, row_bytes] -> float32 [n, cols] (every type ggml reads, i-quants too)."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty((data.shape[0], cols), dtype=np.float32)
    _to_float(ggml_type)(data.ctypes.data, out.ctypes.data, out.size)
    return out


def quantize(x: np.ndarray, ggml_type: int, *, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [..., k] -> uint8 [..., row_bytes] in `ggml_type`; `imatrix` (per column) weights ggml's types."""
    t = T(ggml_type)
    x = np.asarray(x, dtype=np.float32)
    if t == T.F32:
        return np.ascontiguousarray(x).view(np.uint8)
    quantizer = BY_TYPE[t].quantizer if t in BY_TYPE else None
    if quantizer == "gguf":
        return gguf_quants.quantize(x, t)
    if quantizer == "ggml":
        return ggml_quantize(x.reshape(-1, x.shape[-1]), t, imatrix=imatrix).reshape(*x.shape[:-1], -1)
    raise ValueError(f"no quantizer for {t.name}")


def dequantize(data: np.ndarray, ggml_type: int) -> np.ndarray:
    """uint8 block bytes -> float32 (for error measurement): ggml's decoder for its types, gguf's for the rest."""
    if BY_TYPE.get(ggml_type) is None or BY_TYPE[ggml_type].quantizer != "ggml":
        return gguf_quants.dequantize(data, T(ggml_type))
    block, size = GGML_QUANT_SIZES[T(ggml_type)]
    rows = data.reshape(-1, data.shape[-1])
    return ggml_dequantize(rows, ggml_type, rows.shape[1] // size * block).reshape(*data.shape[:-1], -1)
