"""The evaluation text: the built-in one (`data/`, written for the project, CC0) or the user's `--text FILE`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.errors import UsageError

DATA = Path(__file__).parent / "data"
BUILTIN = "mixed-v1"  # English prose, code, LaTeX mathematics and Chinese: data/README.md
MIN_CTX = 16  # the smallest --ctx eval accepts
MAX_TEXT_BYTES = 64 << 20  # llama-perplexity holds the text and its tokens in memory


@dataclass(frozen=True)
class EvalText:
    name: str  # "builtin:mixed-v1" or the file's path, as the record names it
    path: Path  # what llama-perplexity reads (`-f`)
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def load_text(path: Path | None) -> EvalText:
    """The built-in text when `path` is None, else the file (UTF-8, at most 64 MiB); errors name `--text`."""
    if path is None:
        builtin = DATA / f"{BUILTIN}.txt"
        return EvalText(f"builtin:{BUILTIN}", builtin, builtin.read_text(encoding="utf-8"))
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise UsageError(f"--text {path}: larger than {MAX_TEXT_BYTES >> 20} MiB", hint="use a shorter text")
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError as e:
        raise UsageError(f"--text {path} is a folder", hint="give a UTF-8 text file") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"--text {path} is not UTF-8 text", hint="give a UTF-8 text file") from e
    except OSError as e:
        raise UsageError(f"--text {path}: {e.strerror}", hint="give a readable UTF-8 text file") from e
    return EvalText(str(path.resolve()), path, text)


def chunks_for(tokens: int, ctx: int, wanted: int | None, text: EvalText) -> int:
    """How many `ctx`-token chunks llama-perplexity will score: all the text holds, or `--chunks` if fewer.

    It needs at least two chunks' worth of tokens (tools/perplexity/perplexity.cpp); less is a UsageError."""
    if tokens < 2 * ctx:
        raise UsageError(
            f"the evaluation text ({text.name}) is {tokens} tokens for this model; --ctx {ctx} needs at least "
            f"{2 * ctx}",
            hint=f"lower --ctx (at most {tokens // 2}) or give a longer --text"
            if tokens // 2 >= MIN_CTX
            else f"give a longer --text (at least {2 * MIN_CTX} tokens, with --ctx {MIN_CTX})",
        )
    return min(tokens // ctx, wanted) if wanted else tokens // ctx
