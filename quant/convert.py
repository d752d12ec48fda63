"""Official safetensors checkpoint -> deepseek4 GGUF, in one streaming pass.

Memory stays bounded by a few pieces whatever the model size: non-expert tensors are converted in row chunks,
and each stacked expert tensor one expert at a time; a few pieces are in flight on a small thread pool
(`QuantOptions.workers`; numpy and ggml release the GIL), across tensor boundaries, and each is appended to the
output, in order, as soon as it and those before it are ready. The whole checkpoint is checked (every tensor
mapped, every expected tensor present with the right dtype and shape) before the output is created.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from quant.errors import CheckpointError, QuantError, UnsupportedError
from quant.experts import ExpertResult, quantize_expert, repack_fp4
from quant.files import PULL_HINT
from quant.gguf_keys import (
    BUDGET_KEY,
    DENSE_KEY,
    DSV4_KEYS,
    EXPERTS_KEY,
    FIT_KEYS,
    IMATRIX_KEY,
    MIX_KEY,
    NAME,
    SOURCE_KEY,
    SUMMARY_KEY,
)
from quant.gguf_out import StreamingGGUF
from quant.imatrix import Imatrix, load_imatrix
from quant.mapping import KeyValue, TensorPlan, facts_of, gguf_metadata, gguf_name, plan_tensors, typed_kv
from quant.outlock import output_lock, write_error
from quant.quantizers import quantize
from quant.recipes import BY_TYPE, DEFAULT_DENSE, DEFAULT_EXPERTS, RECIPES
from quant.safetensors import Checkpoint
from quant.source import CHUNK_BYTES, SCALE_DTYPES, SourceTensors, fp4_scale_shape, fp8_block, scale_name
from quant.tokenizer import load_vocab

T = GGMLQuantizationType
WORKERS = 2
FP4_METHOD = "lossless FP4 repack"
FIT_METHOD = "fitted mix: lossless FP4 repack where mxfp4, else ggml's quantizers (importance-weighted)"
SUMMARY_WIDTH = 384  # fixed-width placeholder, patched in place once the experts are done
Progress = Callable[[int, int], None]  # (source bytes done, source bytes total)


@dataclass(frozen=True)
class QuantOptions:
    """Recipe (`experts`, `dense`), MTP block, shard size in bytes (0 = one file), worker threads; an importance
    matrix file (`quant.imatrix`, "" = none); a fitted mix (fit group -> recipe, `quant.fit_groups`) and the budget
    in bytes it was fitted to (0 = none)."""

    experts: str = DEFAULT_EXPERTS
    dense: str = DEFAULT_DENSE
    mtp: bool = False
    split_max_size: int = 0
    workers: int = WORKERS
    imatrix: str = ""
    mix: tuple[tuple[str, str], ...] = ()
    budget: int = 0


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
    resumed_tensors: int = 0
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


# ---- checking the checkpoint --------------------------------------------------------------------------------


def check_checkpoint(ckpt: Checkpoint, facts: dict[str, Any], plans: list[TensorPlan], *, mtp: bool) -> None:
    """Every checkpoint tensor maps into this model's GGUF (or is dropped on purpose); every planned source
    exists with a usable dtype and exactly the shape the config implies (a transposed tensor has the right
    element count and would convert silently wrong), and its scale companion fits it."""
    planned = {p.spec.name for p in plans}
    for name in ckpt.names():
        target = gguf_name(name, facts, mtp=mtp)
        if target is not None and target not in planned:
            raise CheckpointError(
                f"{ckpt.path_of(name)}: tensor '{name}' does not fit this model ({target} is not in its layout)",
                hint="config.json and the weights disagree",
            )
    for plan in plans:
        for source in plan.sources:
            if source not in ckpt:
                raise CheckpointError(
                    f"{ckpt.folder}: tensor '{source}' (for {plan.spec.name}) is missing from the checkpoint",
                    hint="the download is incomplete or this is not the model the config describes",
                )
            _check_source(ckpt, plan, source, int(facts["weight_block_size"][0]))


def _squeezed(shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _check_source(ckpt: Checkpoint, plan: TensorPlan, source: str, block: int) -> None:
    info = ckpt.info(source)
    path = ckpt.path_of(source)
    usable = ("I64", "I32") if plan.kind == "i32" else ("F8_E4M3", "I8", "BF16", "F16", "F32")
    if info.dtype not in usable:
        raise CheckpointError(f"{path}: tensor '{source}' has unexpected dtype {info.dtype}")
    expected = list(reversed(plan.spec.ne[:-1] if plan.kind == "experts" else plan.spec.ne))
    if plan.kind == "concat":
        expected[-1] //= len(plan.sources)
    shape = list(info.shape)
    if info.dtype == "I8" and shape:
        shape[-1] *= 2  # two FP4 values per byte
    if _squeezed(shape) != _squeezed(expected):
        raise CheckpointError(
            f"{path}: tensor '{source}' has shape {list(info.shape)}, expected {expected} "
            f"for {plan.spec.name} {list(plan.spec.ne)}",
            hint="config.json and the weights disagree",
        )
    scale = scale_name(source)
    if info.dtype not in ("F8_E4M3", "I8"):
        return
    if scale not in ckpt:
        raise CheckpointError(f"{path}: {info.dtype} tensor '{source}' has no '{scale}'", hint=PULL_HINT)
    scale_info = ckpt.info(scale)
    if info.dtype == "I8":
        fits = scale_info.shape == fp4_scale_shape(info.shape)
    else:
        fits = fp8_block(info.shape, scale_info.shape, block) is not None
    if scale_info.dtype not in SCALE_DTYPES or not fits:
        raise CheckpointError(
            f"{ckpt.path_of(scale)}: tensor '{scale}' ({scale_info.dtype} {list(scale_info.shape)}) is no scale "
            f"grid of '{source}' {list(info.shape)}",
            hint="config.json and the weights disagree, or the download is damaged",
        )


# ---- conversion ---------------------------------------------------------------------------------------------


def quantize_checkpoint(src: Path, out: Path, options: QuantOptions, progress: Progress | None = None) -> QuantReport:
    """Convert checkpoint folder `src` into `out` (+ shards with `split_max_size`) and `<out>.report.json`.

    Holds the output's lock throughout (a second run on `out` fails at once, naming this process) and resumes
    after the last complete tensor of an interrupted run with the same inputs. Write failures raise OutputError
    (one line; on a full disk the partial output is removed first).
    """
    started = time.monotonic()
    ckpt = Checkpoint(Path(src))
    try:
        facts = facts_of(ckpt.config)
    except QuantError as e:  # name the file, not just "config.json"
        raise type(e)(str(e).replace("config.json", str(ckpt.folder / "config.json"), 1), hint=e.hint) from e
    plans = plan_tensors(
        ckpt.config, experts=options.experts, dense=options.dense, mtp=options.mtp, mix=dict(options.mix)
    )
    check_checkpoint(ckpt, facts, plans, mtp=options.mtp)
    importance = _importance(options, plans)
    vocab = load_vocab(ckpt.folder, ckpt.config)
    source = SourceTensors(ckpt, facts)
    total = sum(source.nbytes(s) for p in plans for s in p.sources)
    fp4_experts = facts["expert_dtype"] == "fp4" and RECIPES[options.experts].fp4_repack
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
        expert_method=(FIT_METHOD if options.mix else FP4_METHOD if fp4_experts else "per-expert block scale search"),
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
        *(
            typed_kv(key, value, DSV4_KEYS[key])
            for key, value in (
                (NAME, ckpt.folder.name),
                (EXPERTS_KEY, options.experts),
                (DENSE_KEY, options.dense),
                (SOURCE_KEY, ckpt.folder.name),
                (SUMMARY_KEY, placeholder.decode()),
            )
        ),
        *_fit_metadata(options, importance),
        *vocab.metadata(),
    ]
    try:
        with output_lock(out):
            _write(source, plans, out, options, kv, placeholder, report, progress, started, importance)
    except OSError as e:
        if isinstance(e, QuantError):
            raise
        raise write_error(e, Path(out)) from e
    finally:
        ckpt.close()
    return report


def _importance(options: QuantOptions, plans: list[TensorPlan]) -> Imatrix | None:
    """The importance matrix of `--imatrix`; refuses the i-quants without one (their codebook search needs it)."""
    if options.imatrix:
        return load_imatrix(Path(options.imatrix))
    for plan in plans:
        recipe = BY_TYPE.get(plan.spec.ggml_type)
        if recipe and recipe.needs_imatrix:
            flag = "--experts" if plan.kind == "experts" else "--dense"
            raise UnsupportedError(
                f"{flag} {recipe.name} needs an importance matrix: pass --imatrix FILE",
                hint="make one with `dsv4 imatrix MODEL` (from the lossless GGUF)",
            )
    return None


def _tensor_importance(imatrix: Imatrix | None, plan: TensorPlan, options: QuantOptions) -> np.ndarray | None:
    """Per-column importance [matrices, columns] of one planned tensor: from the imatrix when a token reached it,
    uniform for i-quants no token reached (the MTP block), else None (the quantizer's own choice)."""
    cols = plan.spec.ne[0]
    rows = imatrix.importance(plan.spec.name) if imatrix is not None else None
    if rows is not None and rows.shape[1] != cols:
        raise CheckpointError(
            f"--imatrix {options.imatrix}: {plan.spec.name} has {cols} columns, the imatrix {rows.shape[1]}",
            hint="the importance matrix was made for another model",
        )
    recipe = BY_TYPE.get(plan.spec.ggml_type)
    if rows is None and recipe is not None and recipe.needs_imatrix:
        return np.ones((plan.spec.ne[2] if plan.kind == "experts" else 1, cols), dtype=np.float32)
    return rows


def _fit_metadata(options: QuantOptions, imatrix: Imatrix | None) -> list[KeyValue]:
    """dsv4.fit.* and dsv4.imatrix: the budget and chosen mix of a fitted quant, the importance matrix used."""
    values: dict[str, str] = {}
    if options.budget:
        values[BUDGET_KEY] = str(options.budget)
    if options.mix:
        values[MIX_KEY] = json.dumps(dict(options.mix), separators=(",", ":"))
    if imatrix is not None:
        what = {"file": Path(options.imatrix).name, "dataset": imatrix.dataset, "tokens": imatrix.tokens}
        values[IMATRIX_KEY] = json.dumps(what, separators=(",", ":"))
    return [typed_kv(key, value, FIT_KEYS[key]) for key, value in values.items()]


def _identity(ckpt: Checkpoint, options: QuantOptions) -> dict[str, Any]:
    """What the output depends on besides its header: the options and every source file's size and mtime
    (a re-downloaded or edited checkpoint must not be resumed into)."""
    files = sorted(
        p for p in ckpt.folder.iterdir() if p.suffix in (".json", ".safetensors", ".jinja") and p.name[0] != "."
    )
    if options.imatrix:
        files.append(Path(options.imatrix))
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    options_seen = json.loads(json.dumps({k: v for k, v in asdict(options).items() if k != "workers"}))  # as stored
    return {"options": options_seen, "files": stats}


def _write(
    source: SourceTensors,
    plans: list[TensorPlan],
    out: Path,
    options: QuantOptions,
    kv: list[KeyValue],
    placeholder: bytes,
    report: QuantReport,
    progress: Progress | None,
    started: float,
    importance: Imatrix | None,
) -> None:
    """Stream every planned tensor into the output, then patch the summary in and commit the files."""
    fp4_experts = report.expert_method in (FP4_METHOD, FIT_METHOD)
    specs = [p.spec for p in plans]
    identity = _identity(source.ckpt, options)
    with (
        StreamingGGUF(out, report.arch, kv, specs, split_max_size=options.split_max_size, identity=identity) as w,
        ThreadPoolExecutor(options.workers) as pool,
    ):
        report.resumed_tensors = len(w.resumed)
        for written in w.resumed:
            report.expert_errors.extend(ExpertError(**e) for e in written.record)
        done = sum(source.nbytes(s) for p in plans[: len(w.resumed)] for s in p.sources)
        todo = plans[len(w.resumed) :]
        jobs = _tagged_jobs(todo, source, fp4_experts, lambda plan: _tensor_importance(importance, plan, options))
        tensor_errors: list[ExpertError] = []
        opened = -1  # index in `todo` of the tensor being written

        def open_up_to(index: int) -> None:
            """Finish the open tensor and begin every one up to `index` (a tensor without rows has no pieces)."""
            nonlocal opened
            while opened < index:
                if opened >= 0:
                    w.finish([asdict(e) for e in tensor_errors])
                    report.expert_errors.extend(tensor_errors)
                    tensor_errors.clear()
                opened += 1
                if opened < len(todo):
                    w.begin(todo[opened].spec.name)

        # one window over every tensor's pieces, so the workers never wait for the last piece of a tensor
        for index, (data, read, errors) in _in_order(pool, jobs, window=2 * options.workers):
            open_up_to(index)
            w.append(data)
            tensor_errors.extend(errors)
            done += read
            if progress:
                progress(done, report.source_bytes)
        open_up_to(len(todo))
        summary = json.dumps(report.summary(), separators=(",", ":")).encode()
        w.patch(placeholder, summary.ljust(SUMMARY_WIDTH)[:SUMMARY_WIDTH])
        report.seconds = time.monotonic() - started
        report.outputs = [str(p) for p in w.paths]
        report_tmp = w.tmp / "report.json"
        report_tmp.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
        w.commit(extra={report_tmp: Path(report.report_file)})


# A job returns (output bytes, source bytes it consumed, expert errors); jobs run on the pool, results stay in order.
Piece = tuple[np.ndarray, int, list[ExpertError]]
Job = Callable[[], Piece]


def _tagged_jobs(
    plans: list[TensorPlan],
    source: SourceTensors,
    fp4_experts: bool,
    importance_of: Callable[[TensorPlan], np.ndarray | None],
) -> Iterator[tuple[int, Job]]:
    """Every tensor's jobs in file order, each with the index of its tensor in `plans`."""
    for index, plan in enumerate(plans):
        source.prefetch(plan.sources)
        weights = importance_of(plan)
        if plan.kind == "experts":
            jobs = _expert_jobs(source, plan, fp4_experts, weights)
        else:
            jobs = _dense_jobs(source, plan, weights)
        for job in jobs:
            yield index, job


def _in_order(pool: ThreadPoolExecutor, jobs: Iterator[tuple[int, Job]], *, window: int) -> Iterator[tuple[int, Piece]]:
    """Run jobs on the pool with at most `window` in flight (bounded memory), yielding results in job order."""
    pending: deque[tuple[int, Future[Piece]]] = deque()

    def oldest() -> tuple[int, Piece]:
        index, future = pending.popleft()
        return index, future.result()

    for index, job in jobs:
        pending.append((index, pool.submit(job)))
        if len(pending) >= window:
            yield oldest()
    while pending:
        yield oldest()


def _dense_jobs(source: SourceTensors, plan: TensorPlan, weights: np.ndarray | None) -> Iterator[Job]:
    """A non-expert tensor in row chunks: copied bit for bit when the type is unchanged, else decoded + quantized."""
    target = plan.spec.ggml_type
    name = plan.sources[0]
    info = source.ckpt.info(name)
    rows = source.rows(name)
    if plan.kind == "i32":

        def ids() -> Piece:
            table = source.ckpt.read(name)
            if table.size and (table.min() < 0 or table.max() >= source.n_experts):
                path = source.ckpt.path_of(name)
                raise CheckpointError(f"{path}: tensor '{name}' has expert ids outside [0, {source.n_experts})")
            return table.astype(np.int32), info.nbytes, []

        yield ids
        return
    if (target, info.dtype) in ((T.BF16, "BF16"), (T.F32, "F32")):
        step = max(1, CHUNK_BYTES // max(info.nbytes // max(rows, 1), 1))

        def copy(start: int) -> Piece:
            data = source.ckpt.read(name, start, start + step)
            return data, data.nbytes, []

        for start in range(0, rows, step):
            yield lambda start=start: copy(start)
        return
    width = plan.spec.ne[0] // len(plan.sources)
    step = source.row_step(width)
    per_row = sum(source.nbytes(s) for s in plan.sources) / max(rows, 1)

    groups = 1 if weights is None else weights.shape[0]
    per_group = rows // groups  # the grouped output projection: group g is rows [g * per_group, (g + 1) * ...)

    def chunk(start: int, stop: int) -> Piece:
        x = np.concatenate([source.floats(s, start, stop) for s in plan.sources], axis=1)
        row_weights = None if weights is None else weights[start // per_group]
        return quantize(x, target, imatrix=row_weights), round(per_row * (stop - start)), []

    groups_at = range(0, rows, per_group)
    bounds = [(a, min(g + per_group, a + step)) for g in groups_at for a in range(g, g + per_group, step)]
    for start, stop in bounds:  # a chunk never spans two groups
        yield lambda start=start, stop=stop: chunk(start, stop)


def _expert_jobs(
    source: SourceTensors, plan: TensorPlan, fp4_repack: bool, weights: np.ndarray | None
) -> Iterator[Job]:
    """One job per expert, in expert order: FP4 repack (lossless) or the per-expert search."""
    layer = int(plan.spec.name.split(".")[1])
    proj = plan.spec.name.split(".")[2]
    target = plan.spec.ggml_type

    def one(index: int) -> Piece:
        name = plan.sources[index]
        read = source.nbytes(name)
        if fp4_repack and target in BY_TYPE and BY_TYPE[target].fp4_repack and source.ckpt.info(name).dtype == "I8":
            data = repack_fp4(source.ckpt.read(name), source.ckpt.read(scale_name(name)))
            return data, read, [ExpertError(layer, index, proj, 0.0, 0.0, 0.0)]
        importance = None if weights is None else weights[index]
        result: ExpertResult = quantize_expert(source.floats(name), target, importance)
        return result.data, read, [ExpertError(layer, index, proj, result.rms, result.max_abs, result.plain_rms)]

    for index in range(len(plan.sources)):
        yield lambda index=index: one(index)
