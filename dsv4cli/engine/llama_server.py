"""The llama-server engine: the `Engine` protocol over a llama-server child of the engine build.

`dsv4 chat --engine server` runs the same REPL on it as on the in-process engine, for what only llama-server
does: a GPU build other than the installed llama-cpp-python's, RPC workers, MTP drafting. The server is started
exactly as `dsv4 serve` starts it (`dsv4cli.server.launch.serve_prepared`: loopback, a free port, one slot) and
stopped with the engine. Prompts are rendered by dsv4 as for the in-process engine, tokenized by the server
without a BOS (the template writes it), and completed on its native `/completion` endpoint with the prompt
cache on, so a follow-up turn prefills only its new tokens.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsv4cli.engine.base import SampleOptions, TurnStats, TurnStream
from dsv4cli.errors import RuntimeLoadError
from dsv4cli.load.prepared import PreparedModel
from dsv4cli.server.launch import RunningServer

REQUEST_TIMEOUT_S = 3600.0  # one turn of a large model on a slow machine; Ctrl-C ends it sooner
STOPPED = {"eos": "eos", "word": "eos", "limit": "length"}


class ServerEngine:
    """One llama-server child serving one conversation (slot 0)."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server

    def _post(self, path: str, body: dict[str, Any], *, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        request = urllib.request.Request(
            self.server.base_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeLoadError(
                f"llama-server stopped answering ({e}); log: {self.server.process.log}",
                hint=self.server.process.log_tail() or "run the command again with a smaller --ctx",
            ) from e

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text` with special tokens parsed and no BOS added (the chat template writes it)."""
        with self._post("/tokenize", {"content": text, "add_special": False, "parse_special": True}) as reply:
            return json.load(reply)["tokens"]

    def stream(self, prompt: str, options: SampleOptions, *, fork_at: int | None = None) -> TurnStream:
        """Text pieces of the answer, then its TurnStats; Ctrl-C closes the request (the server stops there)."""
        body = {
            "prompt": self.tokenize(prompt),
            "n_predict": options.max_tokens,
            "temperature": options.temp,
            "top_p": options.top_p,
            "seed": -1 if options.seed is None else options.seed,
            "stream": True,
            "cache_prompt": True,
            "id_slot": 0,
        }
        start = time.perf_counter()
        first: float | None = None
        final: dict[str, Any] = {}
        reply = self._post("/completion", body)
        try:
            for raw in reply:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                if event.get("content"):
                    first = first or time.perf_counter()
                    yield event["content"]
                if event.get("stop"):
                    final = event
                    break
        except KeyboardInterrupt:
            reply.close()
            yield TurnStats(stopped="interrupted")
            return
        finally:
            reply.close()
        yield turn_stats(final, ttft_s=(first or time.perf_counter()) - start)

    def reset(self) -> None:
        """Nothing to drop: the next prompt shares no prefix, so the server's slot cache is replaced."""

    def close(self) -> None:
        self.server.stop()


def turn_stats(final: dict[str, Any], *, ttft_s: float) -> TurnStats:
    """TurnStats from llama-server's last stream event (`timings`: cache_n reused, prompt_n prefilled)."""
    timings = final.get("timings", {})
    reused, prefill = int(timings.get("cache_n", 0)), int(timings.get("prompt_n", 0))
    return TurnStats(
        prompt_tokens=reused + prefill,
        prefill_tokens=prefill,
        reused_tokens=reused,
        generated_tokens=int(timings.get("predicted_n", 0)),
        ttft_s=ttft_s,
        prefill_tps=float(timings.get("prompt_per_second") or 0.0),
        decode_tps=float(timings.get("predicted_per_second") or 0.0),
        stopped=STOPPED.get(final.get("stop_type", ""), "interrupted"),
    )


def start_server_engine(
    prepared: PreparedModel, *, engine_bin: Path | None, mtp: bool, note: Callable[[str], None]
) -> ServerEngine:
    """Start llama-server for `prepared` (loopback, a free port, one slot) and wrap it as an Engine."""
    from dsv4cli.server.launch import ServeOptions, serve_prepared
    from dsv4cli.server.process import free_port
    from dsv4cli.toolchain.build import find_engine

    opts = ServeOptions(port=free_port("127.0.0.1"), mtp=mtp, parallel=1)
    return ServerEngine(serve_prepared(prepared, opts, find_engine(engine_bin), alias=prepared.gguf.name, note=note))
