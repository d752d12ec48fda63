"""Scoring a prepared model: the command line of the engine build's `llama-perplexity` for it, with the very load
parameters chat and serve use (`PreparedModel.params` as llama.cpp flags, so GPU builds and RPC workers score as
they serve). `dsv4 eval` runs it (perplexity, KL divergence against a reference) and reads its figures.

llama-perplexity cuts the text into chunks of `-c` tokens and asserts `n_batch < n_ctx || n_batch % n_ctx == 0`
(tools/perplexity/perplexity.cpp), so the batch is capped at the chunk length here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from dsv4cli.load.prepared import PreparedModel

TOOL = "llama-perplexity"


def scoring_argv(
    prepared: PreparedModel, *, ctx: int, extra: Sequence[str] = (), engine_bin: Path | None = None
) -> list[str]:
    """`llama-perplexity` of the engine build (or of `engine_bin`'s build) loading `prepared` with `ctx`-token
    chunks, then `extra` (`-f TEXT`, `--chunks N`, `--kl-divergence-base FILE` ...)."""
    from dsv4cli.toolchain.build import find_engine

    params = prepared.params
    batch = min(params.n_batch, ctx)
    chunked = dataclasses.replace(params, n_ctx=ctx, n_batch=batch, n_ubatch=min(params.n_ubatch, batch))
    return [str(find_engine(engine_bin).tool(TOOL)), *chunked.cli_args(prepared.gguf), *extra]
