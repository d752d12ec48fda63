"""`evaluate`: one model against its reference on one text, from MODEL to the recorded result.

The order is the order of cost: resolve both models, check they share architecture and tokenizer, load the text
and check it is long enough (vocabulary only), then the reference's logits (cached), then the model's run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4cli.eval.perplexity import KldResult
from dsv4cli.eval.reference import Reference
from dsv4cli.load.placement import Placement
from dsv4cli.models.ref import ModelRef

if TYPE_CHECKING:
    from dsv4cli.load.prepared import PreparedModel

DEFAULT_CTX = 512  # llama-perplexity's default, and what published KLD ladders use

Progress = Callable[[str, int, int], None]  # (stage, chunks done, chunks in all)


@dataclass(frozen=True)
class EvalOptions:
    ref: ModelRef | None = None  # None: the default reference (`reference.default_reference`)
    text: Path | None = None  # None: the built-in text
    ctx: int = DEFAULT_CTX
    chunks: int | None = None  # None: as many as the text holds
    placement: Placement = field(default_factory=Placement)


@dataclass(frozen=True)
class EvalResult:
    model: Path
    reference: Reference
    text: str
    ctx: int
    chunks: int
    tokens: int  # scored: the second half of every chunk, as llama-perplexity scores them
    kld: KldResult
    seconds: float  # the model's run
    ref_seconds: float  # computing the reference logits; 0 when the cache was reused
    cache_reused: bool

    def to_json(self) -> dict[str, Any]:
        k = self.kld
        return {
            "ppl": k.ppl, "ppl_err": k.ppl_err, "ppl_ref": k.ppl_ref, "ppl_ref_err": k.ppl_ref_err,
            "kld_mean": k.kld_mean, "kld_median": k.kld_median, "kld_p99": k.kld_p99, "kld_p999": k.kld_p999,
            "kld_max": k.kld_max, "top1": k.top1, "rms_dp": k.rms_dp, "tokens": self.tokens,
            "model": str(self.model), "ref": self.reference.name, "ref_path": str(self.reference.gguf),
            "ref_why": self.reference.why, "text": self.text, "ctx": self.ctx, "chunks": self.chunks,
            "seconds": round(self.seconds, 1), "ref_seconds": round(self.ref_seconds, 1),
            "cache_reused": self.cache_reused, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }  # fmt: skip


def prepare(ref: ModelRef | None, placement: Placement, *, note: Callable[[str], None]) -> PreparedModel:
    """The one seam to model loading: MODEL to a checked local GGUF and its load parameters, exactly as `chat`
    and `serve` load it (`dsv4cli.load`)."""
    from dsv4cli.load.prepared import prepare_model

    return prepare_model(ref, placement, note=note)


def evaluate(
    model: ModelRef | None, options: EvalOptions, *, note: Callable[[str], None], progress: Progress
) -> EvalResult:
    """Measure `model` against its reference; raises before any model runs when they cannot be compared, the
    text is too short for the context or the logits do not fit on disk."""
    from dsv4cli.engine.inprocess import count_tokens
    from dsv4cli.engine.scoring import scoring_argv
    from dsv4cli.eval.logits import LogitsKey, reference_logits
    from dsv4cli.eval.perplexity import kld_run, run_tool
    from dsv4cli.eval.record import add_result
    from dsv4cli.eval.reference import check_comparable, default_reference
    from dsv4cli.eval.text import chunks_for, load_text
    from dsv4cli.home import dsv4_home
    from dsv4cli.models.ref import file_ref

    placement = options.placement
    if placement.ctx is None and placement.plan_file is None:
        placement = Placement(**{**placement.__dict__, "ctx": options.ctx})
    prepared = prepare(model, placement, note=note)
    gguf = prepared.gguf
    text = load_text(options.text)  # a text too short is refused before a reference is made or loaded
    tokens = count_tokens(gguf, text.text)  # the reference must share this tokenizer (check_comparable)
    chunks = chunks_for(tokens, options.ctx, options.chunks, text)
    if options.ref is None:
        reference = default_reference(gguf, note=note)
        ref_prepared = prepare(file_ref(reference.gguf), placement, note=note)
    else:
        ref_prepared = prepare(options.ref, placement, note=note)
        reference = Reference(ref_prepared.gguf, options.ref.text, f"{options.ref.text} (--ref)")
    vocab = check_comparable(gguf, reference.gguf)
    note(f"reference: {reference.why}")
    logs = dsv4_home() / "logs"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    ref_files = tuple(sorted(reference.gguf.parent.glob(_shards_glob(reference.gguf)))) or (reference.gguf,)

    def compute(tmp: Path) -> None:
        extra = ["-f", str(text.path), "--chunks", str(chunks), "--kl-divergence-base", str(tmp)]
        argv = scoring_argv(ref_prepared, ctx=options.ctx, extra=extra)
        run_tool(argv, logs / f"eval-{stamp}-ref.log", lambda n: progress("reference", n, chunks))

    started = time.monotonic()
    key = LogitsKey(ref_files, text.sha256, options.ctx, chunks, vocab.n_vocab)
    cached = reference_logits(key, compute, note=note)
    ref_seconds = 0.0 if cached.reused else time.monotonic() - started
    started = time.monotonic()
    log = logs / f"eval-{stamp}.log"
    extra = ["--kl-divergence-base", str(cached.path), "--kl-divergence"]
    argv = scoring_argv(prepared, ctx=options.ctx, extra=extra)
    kld = kld_run(argv, log, chunks, lambda n: progress("model", n, chunks), note)
    result = EvalResult(
        model=gguf, reference=reference, text=text.name, ctx=options.ctx, chunks=chunks,
        tokens=chunks * (options.ctx - 1 - options.ctx // 2), kld=kld, seconds=time.monotonic() - started,
        ref_seconds=ref_seconds, cache_reused=cached.reused,
    )  # fmt: skip
    add_result(gguf, result.to_json())
    return result


def _shards_glob(first: Path) -> str:
    """Every shard of a split set (`x-00001-of-00003.gguf` -> `x-*-of-00003.gguf`), else the file itself."""
    name = first.name
    return name.replace("-00001-of-", "-*-of-") if "-00001-of-" in name else name
