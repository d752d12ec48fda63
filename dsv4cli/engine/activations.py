"""Calibration text through the in-process llama.cpp, collecting an importance matrix (`quant.imatrix`) from the
activations entering every weight matmul: the statistics llama-imatrix computes, without building it.

llama.cpp's scheduler calls `cb_eval` (llama_context_params) for each graph node: first asking whether we want the
node, then, once it is computed, handing it over. We ask for MUL_MAT / MUL_MAT_ID nodes whose weight (src0) is a
GGUF tensor, and read their input (src1) with `ggml_backend_tensor_get` (host or device alike), following its
strides: the grouped output projection gets a permuted view, one matrix per group. For MUL_MAT_ID (routed experts)
src2 holds the chosen expert ids per token, so each row is counted for the expert it went to.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dsv4cli.errors import RuntimeLoadError
from dsv4cli.system import llama_lib
from quant.imatrix import Imatrix

MAX_SRC, MAX_NAME, MAX_DIMS, OP_PARAMS = 10, 64, 4, 64 // 4  # ggml.h


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml.h), read-only."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * MAX_DIMS),
    ("nb", ctypes.c_size_t * MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * OP_PARAMS),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]
_DTYPES = {0: np.float32, 1: np.float16, 26: np.int32}  # GGML_TYPE_F32, F16, I32


def _weight_name(t: GgmlTensor) -> str | None:
    """The GGUF weight a node's src0 is ("blk.0.attn_kv.weight"), None for activations (K, Q, ...)."""
    name = t.name.decode("utf-8", "replace").split(" (")[0]
    return name if name.endswith(".weight") else None


class _Collector:
    """The eval callback and the statistics it fills; `error` keeps the first failure (a callback cannot raise)."""

    def __init__(self, lib: ctypes.CDLL, imatrix: Imatrix) -> None:
        self.lib, self.imatrix = lib, imatrix
        self.error: BaseException | None = None
        names = {lib.ggml_op_name(i).decode(): i for i in range(96) if lib.ggml_op_name(i)}
        self.mul_mat, self.mul_mat_id = names["MUL_MAT"], names["MUL_MAT_ID"]

    def _read(self, t: GgmlTensor) -> np.ndarray:
        """A node's values as an array [ne3, ne2, ne1, ne0], strides followed (views and permutes included)."""
        dtype = _DTYPES[t.type]
        span = self.lib.ggml_nbytes(ctypes.byref(t))
        raw = np.empty(span, dtype=np.uint8)
        self.lib.ggml_backend_tensor_get(ctypes.byref(t), raw.ctypes.data, 0, span)
        shape = tuple(reversed(t.ne[:MAX_DIMS]))
        strides = tuple(reversed(t.nb[:MAX_DIMS]))
        return np.lib.stride_tricks.as_strided(raw.view(dtype), shape, strides).copy()

    def __call__(self, node_ptr: int, ask: bool, _user: int) -> bool:
        try:
            node = ctypes.cast(node_ptr, ctypes.POINTER(GgmlTensor)).contents
            if node.op not in (self.mul_mat, self.mul_mat_id) or not node.src[0] or not node.src[1]:
                return not ask
            weight = node.src[0].contents
            name = _weight_name(weight)
            if ask or name is None:
                return name is not None if ask else True
            if node.src[1].contents.type not in (0, 1):
                return True
            self._collect(node, weight, name)
        except BaseException as e:
            self.error = self.error or e
        return True

    def _collect(self, node: GgmlTensor, weight: GgmlTensor, name: str) -> None:
        x = self._read(node.src[1].contents).astype(np.float32)  # [ne13, ne12, ne11, ne10]
        if node.op == self.mul_mat_id:
            ids = self._read(node.src[2].contents)[0, 0]  # [tokens, used]
            n_exp = weight.ne[2]
            tokens, used = ids.shape
            rows = x[0, :tokens]  # [tokens, ne11 (used or 1), ne10]
            rows = np.broadcast_to(rows, (tokens, used, x.shape[-1])) if rows.shape[1] == 1 else rows[:, :used]
            self.imatrix.add(name, n_exp, ids.reshape(-1), rows.reshape(-1, x.shape[-1]))
            return
        n_mat = weight.ne[2] * weight.ne[3]
        if n_mat == 1:
            rows = x.reshape(-1, x.shape[-1])
            self.imatrix.add(name, 1, np.zeros(rows.shape[0], dtype=np.int64), rows)
            return
        per = max(x.shape[1] // weight.ne[2], 1)  # broadcast: src1 ne2 = ne02 x per
        mats = (np.arange(x.shape[0])[:, None] * weight.ne[2] + np.arange(x.shape[1])[None, :] // per) % n_mat
        mat = np.broadcast_to(mats[:, :, None], x.shape[:3]).reshape(-1)
        self.imatrix.add(name, n_mat, mat, x.reshape(-1, x.shape[-1]))


Progress = Callable[[int, int], None]  # (chunks done, chunks)


def _tokens(llama: Any, vocab: int, text: str) -> list[int]:
    data = text.encode("utf-8")
    array = (llama.llama_token * (len(data) + 16))()
    n = llama.llama_tokenize(vocab, data, len(data), array, len(array), True, False)
    return list(array[: max(n, 0)])


def collect(gguf: Path, text: str, *, chunk: int, max_chunks: int, imatrix: Imatrix,
            progress: Progress | None = None) -> Imatrix:  # fmt: skip
    """Run `text` through `gguf` in chunks of `chunk` tokens (the KV cache cleared between chunks, as
    llama-imatrix does; at most `max_chunks`, 0 = all) and add every weight matmul's input statistics to
    `imatrix`."""
    import llama_cpp as llama

    from dsv4cli.engine.inprocess import _LogSink

    llama_lib.prepare_load(gguf, n_gpu_layers=0)
    lib = llama_lib.ggml_base()
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    log = _LogSink(llama, verbose=False)
    collector = _Collector(lib, imatrix)
    callback = llama.ggml_backend_sched_eval_callback(collector)
    model_params = llama.llama_model_default_params()
    model_params.use_extra_bufts = llama_lib.use_extra_bufts()
    model = llama.llama_model_load_from_file(str(gguf).encode(), model_params)
    if not model:
        raise RuntimeLoadError(f"{gguf}: llama.cpp could not load it ({log.last_error()})")
    params = llama.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = chunk
    params.cb_eval = callback
    ctx = llama.llama_init_from_model(model, params)
    try:
        tokens = _tokens(llama, llama.llama_model_get_vocab(model), text)
        n_chunks = min(max_chunks, max(1, len(tokens) // chunk)) if max_chunks else max(1, len(tokens) // chunk)
        for i in range(n_chunks):
            part = tokens[i * chunk : (i + 1) * chunk]
            if not part:
                break
            llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
            array = (llama.llama_token * len(part))(*part)
            if llama.llama_decode(ctx, llama.llama_batch_get_one(array, len(part))) != 0:
                raise RuntimeLoadError(f"{gguf}: llama_decode failed on calibration chunk {i}")
            if collector.error is not None:
                raise collector.error
            imatrix.tokens += len(part)
            imatrix.chunks += 1
            if progress:
                progress(i + 1, n_chunks)
        imatrix.chunk_size = chunk
    finally:
        llama.llama_free(ctx)
        llama.llama_model_free(model)
    return imatrix
