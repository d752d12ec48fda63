"""models.toml entries, fuzzed: every config fact of a built-in entry (and a Hub entry) set to zero, negative,
huge, string, float, boolean and list values, and structural damage, through `dsv4 pull`, `plan` and `show` in
the shared harness (`tests/fuzz_harness.py`). Each must end with exit 0 or one `error:` line, within seconds and
the harness's memory cap: no traceback, hang or multi-gigabyte allocation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fuzz_harness import clean_failures, registry_cases, run_cases

pytestmark = pytest.mark.fuzz

BAD = [0, -1, 1 << 40, "64", 1.5, True, [1]]
HEAD = '[models.evil]\nbuiltin = true\ndescription = "fuzzed"\n[models.evil.config]\n'
RATIOS = "num_hidden_layers = 4\ncompress_ratios = [0, 0, 4, 128, 0]\n"


def _toml(value: object) -> str:
    return json.dumps(value).lower() if not isinstance(value, str) else json.dumps(value)


def _entries() -> dict[str, str]:
    from quant.config import FLOATS, INT_LISTS, INTS

    entries = {}
    for key in [*INTS, *FLOATS]:
        for value in BAD:
            base = "" if key in ("num_hidden_layers",) else RATIOS
            entries[f"{key}={value!r}"] = HEAD + base + f"{key} = {_toml(value)}\n"
    for key in INT_LISTS:
        for value in ([-1] * 5, [1 << 40] * 5, ["a"] * 5, list(range(100_000)), 7):
            entries[f"{key}={str(value)[:20]}"] = HEAD + "num_hidden_layers = 4\n" + f"{key} = {_toml(value)}\n"
    entries["hub entry, zero vocab"] = '[models.evil]\nrepo = "a/b"\n[models.evil.config]\nvocab_size = 0\n'
    entries["config not a table"] = '[models.evil]\nbuiltin = true\nconfig = "x"\n'
    entries["nested table in config"] = HEAD + RATIOS + "[models.evil.config.hidden_size]\nx = 1\n"
    entries["deep inline tables"] = HEAD + "x = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n"
    return entries


def test_fuzzed_registry_entries_fail_cleanly(tmp_path: Path, python: str) -> None:
    commands = [["pull", "evil"], ["plan", "evil"], ["show", "evil"]]
    cases = registry_cases(tmp_path / "homes", _entries(), commands)
    results = run_cases(python, cases, tmp_path / "work", memory=4 << 30, seconds=20)
    bad = clean_failures(results)
    assert not bad, json.dumps(bad[:5], indent=1)[:4000]
    sizing = ("hidden_size=", "num_hidden_layers=", "n_routed_experts=", "vocab_size=", "moe_intermediate_size=")
    refused = [r["code"] == 1 for r in results if r["entry"].startswith(sizing)]
    assert refused and all(refused)  # every bad value of a dimension that sizes the checkpoint is refused
