"""Render a chat template from an untrusted GGUF in a child process with a memory cap, a deadline and an output cap.

Jinja's sandbox stops a template from reaching Python internals but, as its documentation says, not from
exhausting resources: `{{ 'x' * 10**10 }}`, `{{ 10**10**8 }}`, nested loops or unbounded macro recursion run as
single C operations that no in-process watchdog can interrupt. So templates compile and render in a child
(`python -m dsv4cli.chat.template_sandbox`) started before llama.cpp loads: address space capped by RLIMIT_AS, each
render given a wall-clock deadline after which the child is killed (and started again for the next render), the
output capped in length. Requests and replies are JSON lines on the child's stdin/stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from typing import Any

RENDER_SECONDS = 10.0
MEMORY_BYTES = 1 << 30
MAX_OUTPUT_CHARS = 8 << 20  # about 2M tokens: twice the longest context of DeepSeek V4
RECURSION_LIMIT = 1000


class TemplateFailure(Exception):
    """The template did not compile or render within the limits; the message says why, in one line."""


class TemplateSandbox:
    """A template compiled in its child process; `render(**variables)` returns the text or raises TemplateFailure.

    The child starts and compiles while the caller goes on (loading the model), so its start costs no latency;
    a compile error is reported by the first render.
    """

    def __init__(self, template: str, *, seconds: float = RENDER_SECONDS) -> None:
        self.template = template
        self.seconds = seconds
        self._proc: subprocess.Popen[bytes] | None = None
        self._compiled = False
        self._start()

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dsv4cli.chat.template_sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal interrupts the chat, not the template's process
        )
        self._compiled = False
        self._send({"template": self.template}, "compile")

    def render(self, **variables: Any) -> str:
        if self._proc is None:
            self._start()
        if not self._compiled:
            self._receive("compile")
            self._compiled = True
        self._send({"variables": variables}, "render")
        return self._receive("render")

    def _send(self, request: dict[str, Any], what: str) -> None:
        try:
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")  # ASCII JSON: lone surrogates survive
            self._proc.stdin.flush()
        except OSError as e:
            self.close()
            raise TemplateFailure(f"{what} failed: the template process ended (out of memory?)") from e

    def _receive(self, what: str) -> str:
        try:
            assert self._proc is not None and self._proc.stdout is not None
            reply = _read_line(self._proc.stdout.fileno(), time.monotonic() + self.seconds)
        except TimeoutError as e:
            self.close()
            raise TemplateFailure(f"{what} took longer than {self.seconds:g} s") from e
        except BaseException:  # Ctrl-C while waiting: its late reply must not answer the next request
            self.close()
            raise
        if reply is None:
            self.close()
            raise TemplateFailure(f"{what} failed: the template process ended (out of memory?)")
        answer = json.loads(reply)
        if "error" in answer:
            self.close()
            raise TemplateFailure(f"{what} failed: {answer['error']}")
        return answer["text"]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the child also ends on its closed stdin
            self.close()


def _read_line(fd: int, deadline: float) -> bytes | None:
    """One reply line from the child, None at end of file; TimeoutError past `deadline`."""
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return None
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)


# -- the child -------------------------------------------------------------------------------------------------


def _environment() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["from_json"] = json.loads
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env


def _render(template: Any, variables: dict[str, Any]) -> str:
    out: list[str] = []
    size = 0
    for chunk in template.generate(**variables):
        size += len(chunk)
        if size > MAX_OUTPUT_CHARS:
            raise ValueError(f"the output is longer than {MAX_OUTPUT_CHARS} characters")
        out.append(chunk)
    return "".join(out)


def _serve() -> None:
    import resource

    from quant.files import shown

    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(MEMORY_BYTES, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.setrecursionlimit(RECURSION_LIMIT)
    env = _environment()
    template = None
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            if "template" in request:
                template = env.from_string(request["template"])
                reply: dict[str, Any] = {"text": ""}
            else:
                reply = {"text": _render(template, request["variables"])}
        except MemoryError:
            reply = {"error": f"it needs more than {MEMORY_BYTES >> 20} MiB of memory"}
        except RecursionError:
            reply = {"error": "it recurses too deeply"}
        except Exception as e:  # any failure of a stranger's template is reported, never raised
            reply = {"error": f"{type(e).__name__}: {shown(' '.join(str(e).split()), 200)}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
