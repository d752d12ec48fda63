"""The engine interface: what `dsv4 chat` needs from whatever runs the model.

An engine holds one loaded model and its context. `stream()` yields the answer's text pieces as they are
generated and then, as its last item, the turn's `TurnStats`. A caller that stops early (Ctrl-C) calls
`stop(stream)`: it throws KeyboardInterrupt into the stream, the engine ends the turn there and hands back its
statistics (stopped="interrupted"). An engine that is interrupted inside its own code does the same: it ends
the turn and yields the statistics, so the caller sees `stopped == "interrupted"` and decides what to do.

The in-process llama-cpp-python engine (`dsv4cli.engine.inprocess`) is the first implementation; an external
llama.cpp `llama-server` (started with `LoadParams.cli_args`) is meant to be the second.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

TurnStream = Generator["str | TurnStats", None, None]


@dataclass(frozen=True)
class SampleOptions:
    max_tokens: int = 2048
    temp: float = 0.7
    top_p: float = 0.95
    seed: int | None = None


@dataclass
class TurnStats:
    """Per-turn counters: prompt = prefill (decoded this turn) + reused (already in the cache)."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    stopped: str = "eos"  # eos | length | interrupted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Engine(Protocol):
    def stream(self, prompt: str, options: SampleOptions, *, fork_at: int | None = None) -> TurnStream:
        """Text pieces of the answer to a rendered prompt, then its TurnStats.

        `fork_at` is a character offset in `prompt` where the next turn's prompt will differ; an engine that keeps
        a cache may save its state there.
        """

    def reset(self) -> None:
        """Forget the conversation's cached prefix."""

    def close(self) -> None:
        """Free the model and its context."""


def stop(stream: TurnStream) -> TurnStats | None:
    """End a stream early; the engine's final statistics, or None when it ended without giving any."""
    try:
        event = stream.throw(KeyboardInterrupt)
        while not isinstance(event, TurnStats):
            event = next(stream)
    except (KeyboardInterrupt, StopIteration):
        return None
    finally:
        stream.close()
    return event
