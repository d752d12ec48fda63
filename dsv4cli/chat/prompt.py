"""The DeepSeek V4 prompt: render the GGUF's own chat template, and split the model's output into reasoning and answer.

llama-cpp-python's chat handler cannot pass a thinking flag and lacks the template's `from_json` filter
(docs/formats.md §Chat format), so dsv4 renders `tokenizer.chat_template` itself with jinja2 and hands the text to
the runtime. Thinking prompts end in `<｜Assistant｜><think>`; the template drops past reasoning from history.
The template comes from the GGUF, so it is a stranger's code: it runs in `dsv4cli.chat.template_sandbox`, bounded in
time, memory and output length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from dsv4cli.chat.template_sandbox import TemplateFailure, TemplateSandbox
from dsv4cli.errors import RuntimeLoadError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

Message = dict[str, Any]  # {"role": "system"|"user"|"assistant", "content": str, "reasoning_content"?: str}


@dataclass(frozen=True)
class ChatPrompt:
    """Rendered prompt text; `fork_at` marks where the next turn's rendering will differ (thinking opener)."""

    text: str
    fork_at: int | None


class PromptRenderer:
    """Renders message lists with the template embedded in the GGUF (`tokenizer.chat_template`)."""

    def __init__(self, template: str | None, *, bos_token: str, eos_token: str, source: str = "the GGUF") -> None:
        if not template:
            raise RuntimeLoadError(
                f"{source} has no tokenizer.chat_template, so dsv4 cannot build DeepSeek V4 prompts",
                hint="re-create it with `dsv4 quantize`, which embeds the template",
            )
        self._source = source
        try:
            self._template = TemplateSandbox(template)
        except TemplateFailure as e:
            raise self._error(e) from e
        self._bos = bos_token
        self._eos = eos_token

    def _error(self, failure: TemplateFailure) -> RuntimeLoadError:
        return RuntimeLoadError(
            f"the chat template in {self._source}: {failure}", hint="use a GGUF made by `dsv4 quantize`"
        )

    def render(self, messages: list[Message], *, thinking: bool) -> ChatPrompt:
        """The full prompt for the next assistant turn, in thinking or non-thinking mode."""
        try:
            text = self._template.render(
                messages=messages,
                add_generation_prompt=True,
                thinking=thinking,
                enable_thinking=thinking,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except TemplateFailure as e:
            raise self._error(e) from e
        if not text:  # llama.cpp asserts on a prompt of no tokens
            raise self._error(TemplateFailure("it rendered an empty prompt"))
        text = text.encode("utf-8", errors="replace").decode("utf-8")  # lone surrogates (undecodable argv bytes)
        fork_at = len(text) - len(THINK_OPEN) if thinking and text.endswith(THINK_OPEN) else None
        return ChatPrompt(text=text, fork_at=fork_at)

    def close(self) -> None:
        """Stop the template's process (it also ends with this one)."""
        self._template.close()


class ReasoningSplitter:
    """Splits streamed thinking-mode output at `</think>` (which may arrive split across chunks)."""

    def __init__(self, *, thinking: bool) -> None:
        self.in_reasoning = thinking
        self._held = ""

    def feed(self, text: str) -> Iterator[tuple[str, str]]:
        """Yield ("reasoning" | "answer", text) pieces."""
        if not self.in_reasoning:
            yield "answer", text
            return
        buffer = self._held + text
        self._held = ""
        if THINK_CLOSE in buffer:
            before, after = buffer.split(THINK_CLOSE, 1)
            self.in_reasoning = False
            if before:
                yield "reasoning", before
            if after:
                yield "answer", after
            return
        cut = len(buffer) - _partial_suffix(buffer, THINK_CLOSE)  # hold back what may be the start of `</think>`
        self._held = buffer[cut:]
        if cut:
            yield "reasoning", buffer[:cut]

    def flush(self) -> Iterator[tuple[str, str]]:
        if self._held:
            yield ("reasoning" if self.in_reasoning else "answer"), self._held
            self._held = ""

    def split(self, chunks: Iterable[str]) -> Iterator[tuple[str, str]]:
        """Yield ("reasoning" | "answer", text) pieces of a whole stream, held-back text included."""
        for chunk in chunks:
            yield from self.feed(chunk)
        yield from self.flush()


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
