"""What runs before any engine is given a model, in one place: the V4.1 refusal and the GGUF header check.

llama.cpp aborts the process on several bad header values instead of returning an error, so every engine
(in-process or a `llama-server` child) loads only a file `check_model_file` accepted.
"""

from __future__ import annotations

from pathlib import Path

from dsv4cli.errors import RuntimeLoadError
from dsv4cli.gguf_io.check import GgufInfo, check_gguf
from quant.archs import ARCHS


def require_runnable(arch: str, name: str) -> None:
    """Refuse a model no bundled llama.cpp runs before anything (a pull, a quantize) is spent on it."""
    family = ARCHS.get(arch)
    if family is not None and not family.runs:
        raise RuntimeLoadError(f"{name} is a {family.title} model: {family.refusal}", hint=family.refusal_hint)


def check_model_file(path: Path) -> GgufInfo:
    """The header check (architecture, V4.1, keys and tensors llama.cpp would abort on) and the chat facts."""
    return check_gguf(path)
