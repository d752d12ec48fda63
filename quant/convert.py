"""Official safetensors checkpoint -> deepseek4 GGUF, in one streaming pass.

Memory stays bounded by a few tensors whatever the model size: non-expert tensors are converted in row chunks,
and each stacked expert tensor is produced one expert at a time (a few in flight on a small thread pool,
`QuantOptions.workers`; numpy and ggml release the GIL) and appended to the output, in order, as soon as it is
ready. The whole checkpoint is checked (every tensor mapped, every expected tensor present with the right dtype
and shape) before the output is created.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from quant.codecs import bf16_to_f32, dequant_fp8_block, fp4_e2m1_to_f32, scale_grid
from quant.errors import CheckpointError, QuantError
from quant.experts import ExpertResult, quantize_expert, repack_fp4
from quant.gguf_out import StreamingGGUF
from quant.mapping import TensorPlan, facts_of, gguf_metadata, gguf_name, plan_tensors
from quant.quantizers import quantize
from quant.recipes import DEFAULT_DENSE, DEFAULT_EXPERTS
from quant.safetensors import DTYPES, Checkpoint
from quant.tokenizer import load_vocab

T = GGMLQuantizationType
CHUNK_BYTES = 32 << 20  # float32 working set per row chunk of a non-expert tensor
WORKERS = 2
SUMMARY_KEY = "dsv4.expert_error_summary"
SUMMARY_WIDTH = 384  # fixed-width placeholder, patched in place once the experts are done
Progress = Callable[[int, int], None]  # (source bytes done, source bytes total)


@dataclass(frozen=True)
class QuantOptions:
    """Recipe (`experts`, `dense`), MTP block, shard size in bytes (0 = one file), worker threads."""

    experts: str = DEFAULT_EXPERTS
    dense: str = DEFAULT_DENSE
    mtp: bool = False
    split_max_size: int = 0
    workers: int = WORKERS


@dataclass(frozen=True)
class ExpertError:
    """One expert projection's error against its source values; `plain_rms` = the plain quantizer's, for contrast."""

    layer: int
    expert: int
    proj: str
    rms: float
    max_abs: float
    plain_rms: float


@dataclass
class QuantReport:
    """What a conversion wrote and how close the experts are to the source (saved as `<out>.report.json`)."""

    source: str
    outputs: list[str]
    arch: str
    experts: str
    dense: str
    tensors: int
    bytes_written: int
    source_bytes: int
    seconds: float
    expert_method: str
    report_file: str = ""
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    expert_errors: list[ExpertError] = field(default_factory=list)

    def worst(self, n: int = 5) -> list[ExpertError]:
        return sorted(self.expert_errors, key=lambda e: e.rms, reverse=True)[:n]

    def summary(self) -> dict[str, Any]:
        """The compact form stored in GGUF metadata: method, count, RMS statistics and the worst expert."""
        if not self.expert_errors:
            return {"method": self.expert_method, "experts": 0}
        rms = np.array([e.rms for e in self.expert_errors])
        worst = self.worst(1)[0]
        return {
            "method": self.expert_method,
            "experts": len(rms),
            "rms_mean": float(rms.mean()),
            "rms_max": float(rms.max()),
            "max_abs": max(e.max_abs for e in self.expert_errors),
            "worst": f"blk.{worst.layer}.{worst.proj}[{worst.expert}]",
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = self.summary()
        return data


# ---- reading source tensors ---------------------------------------------------------------------------------


class _Source:
    """Float rows of checkpoint tensors, decoding FP8/FP4/BF16 by their stored dtype.

    Rows are read with pread into fresh buffers rather than through the reader's memory maps: pages of a map
    stay resident (and count as RSS) until the shard is closed, so a 160 GB model would look like a 160 GB
    process; reading only the rows of the current chunk keeps memory bounded by the chunk.
    """

    def __init__(self, ckpt: Checkpoint, facts: dict[str, Any]) -> None:
        self.ckpt = ckpt
        self.block = int(facts["weight_block_size"][0])
        self.n_experts = int(facts["n_routed_experts"])
        self._fds: dict[Path, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def nbytes(self, name: str) -> int:
        scale = _scale_name(name)
        return self.ckpt.info(name).nbytes + (self.ckpt.info(scale).nbytes if scale in self.ckpt else 0)

    def rows(self, name: str) -> int:
        return _as_rows(self.ckpt.info(name).shape)[0]

    def row_step(self, width: int) -> int:
        """Rows per chunk: ~CHUNK_BYTES of float32, a multiple of the FP8 block height."""
        step = max(1, CHUNK_BYTES // (4 * max(width, 1)))
        return max(self.block, step // self.block * self.block)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def prefetch(self, names: tuple[str, ...]) -> None:
        """Ask the kernel to read these tensors (and scales) ahead: shards keep them in name order, not in the
        order they are converted, so plain readahead would not help."""
        if not hasattr(os, "posix_fadvise"):
            return
        for name in names:
            for part in (name, _scale_name(name)):
                if part in self.ckpt:
                    info = self.ckpt.info(part)
                    os.posix_fadvise(
                        self._fd(self.ckpt.shard_of(part).path), info.start, info.nbytes, os.POSIX_FADV_WILLNEED
                    )

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor as stored (1-D tensors as one row)."""
        info = self.ckpt.info(name)
        path = self.ckpt.shard_of(name).path
        shape = _as_rows(info.shape)
        stop = shape[0] if stop is None else min(stop, shape[0])
        row_bytes = info.nbytes // max(shape[0], 1)
        want = (stop - start) * row_bytes
        data = os.pread(self._fd(path), want, info.start + start * row_bytes)
        if len(data) != want:
            raise CheckpointError(f"{path}: tensor '{name}': file ends early (truncated while converting?)")
        return np.frombuffer(data, dtype=DTYPES[info.dtype]).reshape(stop - start, *shape[1:])

    def floats(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32."""
        info = self.ckpt.info(name)
        part = self.read(name, start, stop)
        stop = start + part.shape[0]
        if info.dtype == "F8_E4M3":
            return self._fp8(name, part, start, stop, info.shape)
        if info.dtype == "I8" and _scale_name(name) in self.ckpt:
            return fp4_e2m1_to_f32(part, self.read(_scale_name(name), start, stop), name=name)
        if info.dtype == "BF16":
            return bf16_to_f32(part)
        if info.dtype in ("F32", "F16", "F64"):
            return part.astype(np.float32)
        raise CheckpointError(
            f"{self.ckpt.shard_of(name).path}: tensor '{name}' has dtype {info.dtype}, expected a float"
        )

    def _fp8(self, name: str, part: np.ndarray, start: int, stop: int, shape: tuple[int, ...]) -> np.ndarray:
        scale_name = _scale_name(name)
        if scale_name not in self.ckpt:
            raise CheckpointError(f"{self.ckpt.shard_of(name).path}: FP8 tensor '{name}' has no '{scale_name}'")
        scale_shape = self.ckpt.info(scale_name).shape
        rows, cols = shape
        if scale_shape == scale_grid(shape, self.block):
            block: tuple[int, int] = (self.block, self.block)
        elif scale_shape[0] == rows and cols % scale_shape[1] == 0:  # per-row scales (Engram tables)
            block = (1, cols // scale_shape[1])
        else:
            raise CheckpointError(
                f"{self.ckpt.shard_of(scale_name).path}: tensor '{scale_name}' shape {scale_shape} fits no block grid "
                f"of '{name}' {shape}"
            )
        scale = self.read(scale_name, start // block[0], math.ceil(stop / block[0]))
        return dequant_fp8_block(part, scale, block, name=name)


def _as_rows(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape read row by row: 1-D (and scalar) tensors are one row."""
    return shape if len(shape) > 1 else (1, *shape)


def _scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".scale" if name.endswith(".weight") else name + ".scale"


# ---- checking the checkpoint --------------------------------------------------------------------------------


def check_checkpoint(ckpt: Checkpoint, facts: dict[str, Any], plans: list[TensorPlan], *, mtp: bool) -> None:
    """Every checkpoint tensor maps into this model's GGUF (or is dropped on purpose); every planned source
    exists with a usable dtype and the element count the config implies."""
    planned = {p.spec.name for p in plans}
    for name in ckpt.names():
        target = gguf_name(name, facts, mtp=mtp)
        if target is not None and target not in planned:
            raise CheckpointError(
                f"{ckpt.shard_of(name).path}: tensor '{name}' does not fit this model ({target} is not in its layout)",
                hint="config.json and the weights disagree",
            )
    for plan in plans:
        for source in plan.sources:
            if source not in ckpt:
                raise CheckpointError(
                    f"{ckpt.folder}: tensor '{source}' (for {plan.spec.name}) is missing from the checkpoint",
                    hint="the download is incomplete or this is not the model the config describes",
                )
            info = ckpt.info(source)
            path = ckpt.shard_of(source).path
            wanted = math.prod(plan.spec.ne) // (len(plan.sources) if plan.kind in ("experts", "concat") else 1)
            if plan.kind == "i32":
                ok = info.dtype in ("I64", "I32")
            else:
                ok = info.dtype in ("F8_E4M3", "I8", "BF16", "F16", "F32")
            if not ok:
                raise CheckpointError(f"{path}: tensor '{source}' has unexpected dtype {info.dtype}")
            count = math.prod(info.shape) * (2 if info.dtype == "I8" else 1)
            if count != wanted:
                raise CheckpointError(
                    f"{path}: tensor '{source}' has shape {list(info.shape)}, expected {wanted} elements "
                    f"for {plan.spec.name} {list(plan.spec.ne)}",
                    hint="config.json and the weights disagree",
                )


# ---- conversion ---------------------------------------------------------------------------------------------


def quantize_checkpoint(src: Path, out: Path, options: QuantOptions, progress: Progress | None = None) -> QuantReport:
    """Convert checkpoint folder `src` into `out` (+ shards with `split_max_size`) and `<out>.report.json`."""
    started = time.monotonic()
    ckpt = Checkpoint(Path(src))
    try:
        facts = facts_of(ckpt.config)
    except QuantError as e:  # name the file, not just "config.json"
        raise type(e)(str(e).replace("config.json", str(ckpt.folder / "config.json"), 1), hint=e.hint) from e
    plans = plan_tensors(ckpt.config, experts=options.experts, dense=options.dense, mtp=options.mtp)
    check_checkpoint(ckpt, facts, plans, mtp=options.mtp)
    vocab = load_vocab(ckpt.folder, ckpt.config)
    source = _Source(ckpt, facts)
    total = sum(source.nbytes(s) for p in plans for s in p.sources)
    fp4_experts = facts["expert_dtype"] == "fp4" and options.experts == "mxfp4"
    report = QuantReport(
        source=str(ckpt.folder),
        outputs=[],
        arch=facts["arch"],
        experts=options.experts,
        dense=options.dense,
        tensors=len(plans),
        bytes_written=sum(p.spec.nbytes for p in plans),
        source_bytes=total,
        seconds=0.0,
        expert_method="lossless FP4 repack" if fp4_experts else "per-expert block scale search",
        report_file=str(Path(out).with_name(Path(out).name + ".report.json")),
        fallbacks=[
            {"tensor": p.spec.name, "wanted": T(p.requested).name, "used": T(p.spec.ggml_type).name}
            for p in plans
            if p.requested != p.spec.ggml_type
        ],
    )
    placeholder = b"{" + b" " * (SUMMARY_WIDTH - 2) + b"}"
    kv = [
        *gguf_metadata(ckpt.config, experts=options.experts, mtp=options.mtp),
        ("general.name", ckpt.folder.name, GGUFValueType.STRING, None),
        ("dsv4.experts", options.experts, GGUFValueType.STRING, None),
        ("dsv4.dense", options.dense, GGUFValueType.STRING, None),
        ("dsv4.source", ckpt.folder.name, GGUFValueType.STRING, None),
        (SUMMARY_KEY, placeholder.decode(), GGUFValueType.STRING, None),
        *vocab.metadata(),
    ]
    done = 0
    try:
        with (
            StreamingGGUF(out, facts["arch"], kv, [p.spec for p in plans], split_max_size=options.split_max_size) as w,
            ThreadPoolExecutor(options.workers) as pool,
        ):
            for plan in plans:
                w.begin(plan.spec.name)
                source.prefetch(plan.sources)
                jobs = _expert_jobs(source, plan, fp4_experts) if plan.kind == "experts" else _dense_jobs(source, plan)
                for data, read, errors in _in_order(pool, jobs, window=2 * options.workers):
                    w.append(data)
                    report.expert_errors.extend(errors)
                    done += read
                    if progress:
                        progress(done, total)
            summary = json.dumps(report.summary(), separators=(",", ":")).encode()
            w.patch(placeholder, summary.ljust(SUMMARY_WIDTH)[:SUMMARY_WIDTH])
            report.seconds = time.monotonic() - started
            report.outputs = [str(p) for p in w.paths]
            report_tmp = w.tmp / "report.json"
            report_tmp.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
            w.commit(extra={report_tmp: Path(report.report_file)})
    finally:
        source.close()
    return report


# A job returns (output bytes, source bytes it consumed, expert errors); jobs run on the pool, results stay in order.
Piece = tuple[np.ndarray, int, list[ExpertError]]
Job = Callable[[], Piece]


def _in_order(pool: ThreadPoolExecutor, jobs: Iterator[Job], *, window: int) -> Iterator[Piece]:
    """Run jobs on the pool with at most `window` in flight (bounded memory), yielding results in job order."""
    pending: deque[Future[Piece]] = deque()
    for job in jobs:
        pending.append(pool.submit(job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _dense_jobs(source: _Source, plan: TensorPlan) -> Iterator[Job]:
    """A non-expert tensor in row chunks: copied bit for bit when the type is unchanged, else decoded + quantized."""
    target = plan.spec.ggml_type
    name = plan.sources[0]
    info = source.ckpt.info(name)
    rows = source.rows(name)
    if plan.kind == "i32":

        def ids() -> Piece:
            table = source.read(name)
            if table.size and (table.min() < 0 or table.max() >= source.n_experts):
                path = source.ckpt.shard_of(name).path
                raise CheckpointError(f"{path}: tensor '{name}' has expert ids outside [0, {source.n_experts})")
            return table.astype(np.int32), info.nbytes, []

        yield ids
        return
    if (target, info.dtype) in ((T.BF16, "BF16"), (T.F32, "F32")):
        step = max(1, CHUNK_BYTES // max(info.nbytes // max(rows, 1), 1))

        def copy(start: int) -> Piece:
            data = source.read(name, start, start + step)
            return data, data.nbytes, []

        for start in range(0, rows, step):
            yield lambda start=start: copy(start)
        return
    width = plan.spec.ne[0] // len(plan.sources)
    step = source.row_step(width)
    per_row = sum(source.nbytes(s) for s in plan.sources) / max(rows, 1)

    def chunk(start: int) -> Piece:
        stop = min(rows, start + step)
        x = np.concatenate([source.floats(s, start, stop) for s in plan.sources], axis=1)
        return quantize(x, target), round(per_row * (stop - start)), []

    for start in range(0, rows, step):
        yield lambda start=start: chunk(start)


def _expert_jobs(source: _Source, plan: TensorPlan, fp4_repack: bool) -> Iterator[Job]:
    """One job per expert, in expert order: FP4 repack (lossless) or the per-expert search."""
    layer = int(plan.spec.name.split(".")[1])
    proj = plan.spec.name.split(".")[2]
    target = plan.spec.ggml_type

    def one(index: int) -> Piece:
        name = plan.sources[index]
        read = source.nbytes(name)
        if fp4_repack and source.ckpt.info(name).dtype == "I8":
            data = repack_fp4(source.read(name), source.read(_scale_name(name)))
            return data, read, [ExpertError(layer, index, proj, 0.0, 0.0, 0.0)]
        result: ExpertResult = quantize_expert(source.floats(name), target)
        return result.data, read, [ExpertError(layer, index, proj, result.rms, result.max_abs, result.plain_rms)]

    for index in range(len(plan.sources)):
        yield lambda index=index: one(index)
