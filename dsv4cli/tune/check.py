"""The output check: a setting that changes results (a quantized KV cache) is kept only when output stays the same.

How: the in-process engine (the same llama.cpp as chat) loads the model twice in a child process each — once with
the settings before the change, once after — and decodes CHECK_TOKENS tokens greedily (temperature 0) from the
same prompt; the change passes only when the two texts are identical. Greedy decoding makes any difference in
the logits that matters show up as a different token; it is stricter than a KL-divergence threshold, so a
quantized cache is kept only where it is, for this model and prompt, indistinguishable from f16.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from dsv4cli.engine.params import LoadParams

CHECK_TOKENS = 32
CHECK_CTX = 1024
PROMPT = "The history of the printing press begins"


def greedy_text(model: Path, params: LoadParams, *, timeout: float, tokens: int = CHECK_TOKENS) -> str | None:
    """The greedy continuation of PROMPT under `params` (a small context), from a child process; None when it
    fails or outlasts `timeout` (an abort there cannot take `dsv4 tune` down)."""
    if timeout <= 0:
        return None
    small = dataclasses.replace(params, n_ctx=CHECK_CTX)
    code = "import sys; from dsv4cli.tune.check import child; child(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    argv = [sys.executable, "-c", code, str(model), json.dumps(small.to_dict()), str(tokens)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, errors="replace")
    except subprocess.TimeoutExpired:
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TEXT ")]
    return json.loads(lines[-1][5:]) if proc.returncode == 0 and lines else None


def same_output(model: Path, before: LoadParams, after: LoadParams, *, deadline: float) -> bool:
    """Whether `after` decodes the same greedy text as `before` (False also when either run fails or time runs out)."""
    reference = greedy_text(model, before, timeout=deadline - time.monotonic())
    if reference is None:
        return False
    return greedy_text(model, after, timeout=deadline - time.monotonic()) == reference


def child(model: str, params_json: str, tokens: int) -> None:
    """The check's child: load with the given "llama" section and print the greedy text as one JSON line."""
    from dsv4cli.engine import SampleOptions
    from dsv4cli.engine.inprocess import LlamaEngine

    params = LoadParams.from_dict(json.loads(params_json), source="tune check")
    engine = LlamaEngine(Path(model), params)
    pieces = [p for p in engine.stream(PROMPT, SampleOptions(max_tokens=tokens, temp=0.0)) if isinstance(p, str)]
    print("TEXT " + json.dumps("".join(pieces)), flush=True)
