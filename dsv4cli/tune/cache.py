"""Tuned settings on disk: one file per model, machine, llama.cpp build and devices, under `$DSV4_HOME/tune/`.

Like the plan's calibration (`dsv4cli.plan.calibrate`), the key names everything that changes the answer: the
model (the digest of its tensor table, equal for every copy of the same GGUF), the CPU (model and flags) and this
machine's id, the llama.cpp build, and the devices the plan uses (`cpu`, or the GPUs' names and RPC workers).
Another CPU, an upgraded llama-cpp-python or another GPU finds no file and plans with the defaults. A file that
cannot be read back (damaged, hand-edited, another schema) is ignored with a note saying how to replace it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from dsv4cli.atomic import write_text_atomic
from dsv4cli.system import hardware
from dsv4cli.tune.settings import Settings

SCHEMA = "dsv4.tune/1"
MAX_BYTES = 1 << 20


def key_parts(model_digest: str, devices: str) -> dict[str, str]:
    """What a tuned result is valid for (raises when llama.cpp cannot be loaded: then nothing was tuned with it)."""
    from dsv4cli.system import llama_lib

    build = llama_lib.build_info()
    cpu = f"{hardware.cpu_model()}|{' '.join(sorted(hardware.cpu_flags()))}"
    return {
        "model": model_digest,
        "machine": hardware.machine_id(),
        "cpu": hashlib.sha256(cpu.encode()).hexdigest()[:16],
        "engine": f"llama-{build.version}-{build.ggml_commit}",
        "devices": devices,
    }


def cache_file(home: Path, parts: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return home / "tune" / f"{digest}.json"


def save(home: Path, parts: dict[str, str], settings: Settings, *, model: str, report: dict[str, Any]) -> Path:
    """Write the result atomically (a reader never sees half a file)."""
    path = cache_file(home, parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"schema": SCHEMA, "key": parts, "model": model, "tuned_at": time.time(), "settings": settings.to_dict()}
    write_text_atomic(path, json.dumps({**data, "report": report}, indent=2) + "\n")
    return path


def load(home: Path, parts: dict[str, str]) -> tuple[Settings | None, str | None]:
    """(settings, None) when tuned; (None, None) when never tuned; (None, note) when the file is unusable."""
    path = cache_file(home, parts)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError("too large")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("key") != parts:
            raise ValueError("not a tune result for this model and machine")
        return Settings.from_dict(data.get("settings")), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"tuned settings in {path} are unreadable ({e}); using the defaults: run `dsv4 tune` again"
