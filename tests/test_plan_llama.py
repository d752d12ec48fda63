"""The plan's model, KV and compute bytes against what the real llama.cpp allocates (loaded in a subprocess)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("flash_attn", [False, True])
def test_planned_bytes_within_5_percent_of_llama(tiny_gguf: Path, python: str, flash_attn: bool) -> None:
    """Flash attention's compute buffer is a fit (engine/kvcache.py): within 10 % on the tiny model's MiB-sized
    buffers (0.2 % at V4-Flash's widths, bench/plan.py); everything else within 5 %."""
    argv = [python, str(ROOT / "bench" / "plan.py"), "--gguf", str(tiny_gguf), "--ctx", "1024,4096", "--decode", "0"]
    argv += ["--json"] + ([] if flash_attn else ["--no-flash-attn"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [r["n_ctx"] for r in rows] == [1024, 4096]
    for row in rows:
        for key in ("model", "kv", "compute", "total"):
            limit = 0.10 if flash_attn and key == "compute" else 0.05
            assert abs(row[f"{key}_ratio"] - 1) <= limit, (key, row)
        assert row["kv_reported"] > 0 and row["compute_reported"] > 0
