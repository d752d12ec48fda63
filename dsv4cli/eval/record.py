"""Eval results kept beside the model they measure, so `dsv4 show` and `dsv4 list --json` can carry them.

One JSON file per GGUF set: `NAME.gguf.eval.json` beside a converted file, `.dsv4-eval-NAME.gguf.json` in a pulled
repo folder (every name dsv4 adds there starts with `.dsv4-`). It keeps the latest result per (reference, text,
context, chunks), newest first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsv4cli.atomic import write_text_atomic
from dsv4cli.home import models_dir
from dsv4cli.models.local import STATE_PREFIX

SAME = ("ref", "text", "ctx", "chunks")


def record_path(gguf: Path) -> Path:
    from dsv4cli.hub.gguf_repo import set_name

    name = set_name(gguf.name)
    if models_dir().resolve() in gguf.resolve().parents:
        return gguf.parent / f"{STATE_PREFIX}eval-{name}.json"
    return gguf.parent / f"{name}.eval.json"


def read_results(gguf: Path) -> list[dict[str, Any]]:
    """The recorded results, newest first; [] when there are none or the record is unreadable."""
    try:
        data = json.loads(record_path(gguf).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    results = data.get("results") if isinstance(data, dict) else None
    return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []


def add_result(gguf: Path, result: dict[str, Any]) -> Path:
    """Record `result`, replacing an earlier one measured the same way."""
    kept = [r for r in read_results(gguf) if any(r.get(k) != result.get(k) for k in SAME)]
    path = record_path(gguf)
    write_text_atomic(path, json.dumps({"results": [result, *kept]}, indent=2) + "\n")
    return path
