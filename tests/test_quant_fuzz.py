"""Seeded fuzzing of every file `dsv4 quantize` reads: safetensors headers, config.json, the index, tokenizer files.

Each mutation gets its own checkpoint folder (the damaged file copied, the rest symlinked to the session's tiny
checkpoint) and runs through the real `dsv4` entry point in the shared fuzz harness (`tests/fuzz_harness.py`:
worker processes with a memory cap and a per-case alarm), so a crash, hang or blow-up is seen as such instead of
taking the test run down. Every case must end with exit 1 and exactly one `error:` line, or (for a mutation that
happens to be harmless) exit 0; never a traceback.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fuzz_harness import clean_failures, run_cases

pytestmark = pytest.mark.fuzz

SEED = 20261126
CASES_PER_KIND = 70
BAD_VALUES: list[Any] = [
    None, True, False, -1, 0, 1, 3, 10**9, 10**30, -(10**9), 1.5, 1e308, "x", "", [], {}, [1] * 5000, [[[]]],
    {"a": 1}, "\u0000", 2**63, -(2**63),
]  # fmt: skip


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path: Path, header: Any, body: bytes, length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)


def _mutate_safetensors(rng: random.Random, path: Path) -> None:
    header, body = _header(path)
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    choice = rng.randrange(12)
    if choice == 0:
        entry["dtype"] = rng.choice(["F8_E5M2", "Q4_K", 7, None, "BF16", "I64", "F64"])
    elif choice == 1:
        entry["shape"] = rng.choice([[-1], [10**12, 10**12], "4", [True], [1.5], [0], [2**40], [1] * 64, None])
    elif choice == 2:
        begin = entry["data_offsets"][0]
        entry["data_offsets"] = rng.choice(
            [[-8, begin], [begin, 10**15], [begin + 8, begin], [0, 8], [begin, begin + 1], [begin], "0", [0.5, 8]]
        )
    elif choice == 3:
        other = header[rng.choice(names)]
        entry["data_offsets"] = list(other["data_offsets"])  # overlap another tensor
    elif choice == 4:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == 5:
        header[name] = rng.choice(BAD_VALUES)
    elif choice == 6:
        _write_header(path, header, body, length=rng.choice([0, 7, 2**63, 2**64 - 1, len(body) + 10**6, 10**8]))
        return
    elif choice == 7:
        raw = bytearray(json.dumps(header).encode())
        for _ in range(rng.randrange(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        _write_header(path, bytes(raw), body)
        return
    elif choice == 8:
        _write_header(path, rng.choice([b"[1, 2]", b"null", b'"x"', b"[" * 100000, b"\xff\xfe", b"{"]), body)
        return
    elif choice == 9:
        path.write_bytes(path.read_bytes()[: rng.randrange(0, path.stat().st_size)])
        return
    elif choice == 10:
        header["__metadata__"] = rng.choice([[1], "x", 5])
    else:  # start inside another tensor
        extra = header[rng.choice(names)]["data_offsets"][0]
        entry["data_offsets"] = [extra + 4, extra + 4 + entry["data_offsets"][1] - entry["data_offsets"][0]]
    _write_header(path, header, body)


def _mutate_json(rng: random.Random, path: Path, edit: Callable[[Any], Any]) -> None:
    choice = rng.randrange(10)
    if choice == 0:
        path.write_bytes(rng.choice([b"", b"{", b"\xff", b"[]", b"null", b"1e999", b"[" * 50000, b'{"a": NaN']))
    elif choice == 1:  # oversized past any sane cap (sparse, so the test writes nothing)
        with path.open("r+b") as f:
            f.truncate(65 << 20)
    elif choice == 2:
        path.unlink()
        os.symlink("/dev/zero", path)
    elif choice == 3:
        path.unlink()
        os.mkfifo(path)
    else:
        data = json.loads(path.read_bytes())
        data = edit(data)
        path.write_text(json.dumps(data))


def _edit_config(rng: random.Random) -> Callable[[Any], Any]:
    def edit(config: dict) -> Any:
        key = rng.choice(sorted(config))
        if rng.random() < 0.2:
            del config[key]
        else:
            config[key] = rng.choice(BAD_VALUES)
        return config

    return edit


def _edit_index(rng: random.Random) -> Callable[[Any], Any]:
    def edit(index: dict) -> Any:
        weight_map = index["weight_map"]
        name = rng.choice(sorted(weight_map))
        bad = ["../config.json", "/etc/passwd", "missing.safetensors", "", ".", "..", "a\nb", 5, None, "sub/x"]
        choice = rng.randrange(4)
        if choice == 0:
            weight_map[name] = rng.choice(bad)
        elif choice == 1:
            index["weight_map"] = rng.choice(BAD_VALUES)
        elif choice == 2:
            weight_map[name + ".extra"] = weight_map[name]
        else:
            del weight_map[name]
        return index

    return edit


def _edit_tokenizer(rng: random.Random) -> Callable[[Any], Any]:
    def edit(tok: dict) -> Any:
        choice = rng.randrange(6)
        vocab = tok["model"]["vocab"]
        if choice == 0:
            vocab[rng.choice(sorted(vocab))] = rng.choice([-1, 10**12, "3", None, 1.5, True])
        elif choice == 1:
            tok["model"] = rng.choice(BAD_VALUES)
        elif choice == 2:
            tok["model"]["vocab"] = rng.choice([[], "x", 5])
        elif choice == 3:
            tok["added_tokens"] = rng.choice(
                [5, "x", [1], [{"id": "x", "content": 3}], [{"id": 10**10, "content": "a"}]]
            )
        elif choice == 4:
            tok["model"]["merges"] = rng.choice([5, [1, 2], [["a"]], [None]])
        else:
            return rng.choice([[], "x", 5])
        return tok

    return edit


def _edit_tokenizer_config(rng: random.Random) -> Callable[[Any], Any]:
    return lambda _: rng.choice([[], "x", 5, None])


def _make_case(rng: random.Random, source: Path, folder: Path, kind: str) -> None:
    folder.mkdir()
    for item in source.iterdir():
        (folder / item.name).symlink_to(item)
    if kind == "safetensors":
        victim = folder / rng.choice(sorted(p.name for p in source.glob("*.safetensors")))
    else:
        victim = folder / kind
    victim.unlink()
    victim.write_bytes((source / victim.name).read_bytes())
    if kind == "safetensors":
        _mutate_safetensors(rng, victim)
    else:
        edits = {
            "config.json": _edit_config,
            "model.safetensors.index.json": _edit_index,
            "tokenizer.json": _edit_tokenizer,
            "tokenizer_config.json": _edit_tokenizer_config,
        }
        _mutate_json(rng, victim, edits[kind](rng))


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, symlinks to /dev/zero, rlimits")
def test_fuzzed_inputs_fail_cleanly(tiny_checkpoint: Path, tmp_path: Path, python: str) -> None:
    rng = random.Random(SEED)
    kinds = ["safetensors", "config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
    cases = []
    for kind in kinds:
        for i in range(CASES_PER_KIND if kind != "tokenizer_config.json" else CASES_PER_KIND // 3):
            folder = tmp_path / f"{kind}-{i}"
            _make_case(rng, tiny_checkpoint, folder, kind)
            cases.append((str(folder), str(tmp_path / "out" / f"{kind}-{i}.gguf")))
    (tmp_path / "out").mkdir()
    results = run_cases(python, [{"argv": ["quantize", folder, "-o", out]} for folder, out in cases], tmp_path / "fuzz")
    assert len(results) == len(cases) >= 300
    failures = clean_failures(results)
    assert not failures, json.dumps(failures[:5], indent=1)
    assert sum(r["code"] == 1 for r in results) > 0.8 * len(results)  # the mutations really are damage
    assert not list((tmp_path / "out").glob("*.partial"))
