"""Seeded fuzzing of what `dsv4 plan` and `dsv4 chat` read: GGUF headers, plan files and chat templates.

GGUFs are re-serialized here from the tiny model's header (read with gguf-py, written by the small encoder below,
independent of dsv4's reader) with one structural lie each: counts, string and array lengths, ranks, dims, types,
offsets, alignment, duplicate or empty names, nested or unknown value types, absurd values of the deepseek4 keys,
flipped or truncated bytes, or a FIFO / `/dev/zero` / folder in place of the file. The data section is left
sparse (zeros), so hundreds of cases cost no disk. Plan files are the tiny model's plan with one llama key made
hostile; templates are generated from constructs that hang, recurse, allocate or fail. Every case runs through the
real entry point in the shared harness (`tests/fuzz_harness.py`) and must end with exit 0 or exit 1 and one
`error:` line, within the time bound, never a traceback, crash or hang.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest

from tests.fuzz_harness import clean_failures, run_cases

pytestmark = pytest.mark.fuzz

SEED = 20261126
GGUF_CASES, PLAN_CASES, TEMPLATE_CASES = 170, 100, 40
S = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STR, ARR = 8, 9
FACTS = ["block_count", "expert_count", "expert_used_count", "attention.head_count", "hash_layer_count",
         "attention.output_group_count", "attention.indexer.key_length", "hyper_connection.count",
         "attention.key_length", "context_length", "embedding_length"]  # fmt: skip
HUGE = [2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


class Lie:
    """A value written with a declared length that is not its real one (string bytes or array elements)."""

    def __init__(self, declared: int, real: Any) -> None:
        self.declared, self.real = declared, real


def _string(value: Any) -> bytes:
    if isinstance(value, Lie):
        raw = value.real.encode() if isinstance(value.real, str) else value.real
        return struct.pack("<Q", value.declared) + raw
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value: Any, sub: int | None) -> bytes:
    if vtype == STR:
        return _string(value)
    if vtype == ARR:
        items, n = (value.real, value.declared) if isinstance(value, Lie) else (value, len(value))
        head = struct.pack("<IQ", sub, n)
        if sub == STR:
            return head + b"".join(_string(v) for v in items)
        if sub == ARR:
            return head + b"".join(_value(ARR, v, 4) for v in items)
        return head + b"".join(struct.pack("<" + S.get(sub, "I"), v) for v in items)
    return struct.pack("<" + S.get(vtype, "I"), value)


def encode(header: dict[str, Any]) -> bytes:
    """A GGUF header (magic to the end of the tensor infos, padded to the alignment) from its parts."""
    kvs, tensors = header["kv"], header["tensors"]
    out = [b"GGUF", struct.pack("<I", header["version"])]
    out.append(struct.pack("<QQ", header.get("n_tensors", len(tensors)) % 2**64, header.get("n_kv", len(kvs)) % 2**64))
    for key, vtype, value, sub in kvs:
        out.append(_string(key) + struct.pack("<I", vtype) + _value(vtype, value, sub))
    for name, ne, ttype, offset in tensors:
        dims = b"".join(struct.pack("<q", d) for d in ne)
        out.append(
            _string(name) + struct.pack("<I", len(ne)) + dims + struct.pack("<IQ", ttype % 2**32, offset % 2**64)
        )
    raw = b"".join(out)
    align = header.get("pad", 32)
    return raw + b"\0" * (-len(raw) % align)


def parse_tiny(path: Path) -> dict[str, Any]:
    """The tiny GGUF's header as encode() parts, read with gguf-py (not dsv4's reader)."""
    reader = gguf.GGUFReader(path)
    kvs = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        types = [int(t) for t in field.types]
        kvs.append((field.name, types[0], field.contents(), types[1] if len(types) > 1 else None))
    base = reader.tensors[0].data_offset
    tensors = [(t.name, [int(n) for n in t.shape], int(t.tensor_type), t.data_offset - base) for t in reader.tensors]
    return {"version": 3, "kv": kvs, "tensors": tensors, "data": path.stat().st_size - base}


def _mutate_kv(rng: random.Random, h: dict[str, Any]) -> None:
    kvs = h["kv"]
    i = rng.randrange(len(kvs))
    key, vtype, value, sub = kvs[i]
    choice = rng.randrange(12)
    if choice == 0:  # absurd or wrongly typed value of a real key
        bad = rng.choice([(4, 0), (4, 2**32 - 1), (5, -1), (11, -(2**63)), (6, float("nan")), (6, float("inf")),
                          (8, "x"), (8, ""), (7, True), (ARR, [], 5), (ARR, [1, 2**31 - 1], 5), (ARR, ["a"], STR),
                          (10, 2**64 - 1), (12, 1e308)])  # fmt: skip
        kvs[i] = (key, bad[0], bad[1], bad[2] if len(bad) > 2 else None)
    elif choice == 1:  # a string that claims to be longer (or shorter) than it is
        if vtype == STR:
            kvs[i] = (key, vtype, Lie(rng.choice([*HUGE, len(value) + 5, 0]), value), sub)
        else:
            kvs[i] = (Lie(rng.choice(HUGE), key), vtype, value, sub)
    elif choice == 2 and vtype == ARR:  # an array that claims more elements than it holds
        kvs[i] = (key, vtype, Lie(rng.choice([*HUGE, len(value) + 1, 10**9]), value), sub)
    elif choice == 3:
        kvs.append(kvs[i])  # duplicate key
    elif choice == 4:
        kvs[i] = ("", vtype, value, sub)
    elif choice == 5:
        kvs[i] = (key, rng.choice([13, 255, 2**31]), 0, None)  # unknown value type
    elif choice == 6:
        kvs[i] = (key, ARR, [[1, 2]], ARR)  # nested array
    elif choice == 7:
        kvs.append(("huge.array", ARR, [0] * rng.choice([5_000_000, 1 << 20]), 0))
    elif choice == 8:
        kvs.append(("general.alignment", rng.choice([4, 10]), rng.choice([0, 3, 2**31, 1 << 20, 64]), None))
    elif choice == 9:
        kvs[i] = (key.encode() + b"\xff\xfe", vtype, value, sub)  # not UTF-8
    elif choice == 10:  # the deepseek4 facts llama.cpp asserts on or divides by
        fact = rng.choice(FACTS)
        value = rng.choice([0, 1, 3, 513, 1025, 2**31 - 1, 2**32 - 1, 10**6])
        kvs[:] = [kv for kv in kvs if kv[0] != f"deepseek4.{fact}"] + [(f"deepseek4.{fact}", 4, value, None)]
    else:
        key = rng.choice(["tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id", "general.architecture"])
        value = rng.choice([(ARR, [], STR), (ARR, [1, 2], 5), (4, 10**6), (8, "deepseek41"), (8, "llama"), (5, -1)])
        kvs[:] = [kv for kv in kvs if kv[0] != key] + [(key, value[0], value[1], value[2] if len(value) > 2 else None)]


def _mutate_tensor(rng: random.Random, h: dict[str, Any]) -> None:
    tensors = h["tensors"]
    i = rng.randrange(len(tensors))
    name, ne, ttype, offset = tensors[i]
    choice = rng.randrange(9)
    if choice == 0:
        ne = rng.choice([[-1], [2**62, 2**62], [1, 2, 3, 4, 5], [], [2**63 - 1, 2], [ne[0] + 1, *ne[1:]], [0, 0]])
    elif choice == 1:
        ttype = rng.choice([4, 5, 31, 36, 42, 43, 1000, 2**32 - 1])
    elif choice == 2:
        offset = rng.choice([2**63, 2**64 - 1, offset + 1, offset + 32, 0 if i else 32, h["data"] + 4096])
    elif choice == 3:
        tensors.append(tensors[i])  # duplicate name
    elif choice == 4:
        name = rng.choice(["", "x" * 64, "x" * 10**6, "\xff"])
    elif choice == 5:
        name = Lie(rng.choice(HUGE), name)
    elif choice == 6:
        h["n_tensors"] = rng.choice([*HUGE, -1, len(tensors) + 1, 10**6])
    elif choice == 7:
        h["n_kv"] = rng.choice([*HUGE, -1, len(h["kv"]) + 1, 10**6])
    else:
        h["version"] = rng.choice([0, 1, 4, 0x03000000, 2**32 - 1])
    if choice < 6:
        tensors[i] = (name, ne, ttype, offset)


def _write_gguf(rng: random.Random, tiny: dict[str, Any], path: Path) -> None:
    h = json.loads(json.dumps({k: v for k, v in tiny.items()}))
    h["kv"] = [tuple(kv) for kv in h["kv"]]
    h["tensors"] = [tuple(t) for t in h["tensors"]]
    kind = rng.randrange(10)
    if kind < 4:
        _mutate_kv(rng, h)
    elif kind < 7:
        _mutate_tensor(rng, h)
    raw = bytearray(encode(h))
    if kind == 7:  # flipped bytes anywhere in the header
        for _ in range(rng.randrange(1, 9)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
    if kind == 8:  # an absurd 8-byte count/length at a random place
        at = rng.randrange(len(raw) - 8)
        raw[at : at + 8] = struct.pack("<Q", rng.choice(HUGE))
    with path.open("wb") as f:
        f.write(raw)
        f.truncate(len(raw) + tiny["data"])  # sparse data section
    if kind == 9:
        with path.open("r+b") as f:
            f.truncate(rng.randrange(0, len(raw) + tiny["data"]))


def _special_file(rng: random.Random, path: Path, tiny_gguf: Path) -> None:
    choice = rng.randrange(5)
    if choice == 0:
        os.mkfifo(path)
    elif choice == 1:
        path.symlink_to("/dev/zero")
    elif choice == 2:
        path.mkdir()
    elif choice == 3:
        path.write_bytes(b"")
    else:  # the second shard of a split set given first, or a set missing its second shard
        first = path.with_name(path.stem + "-00001-of-00002.gguf")
        first.symlink_to(tiny_gguf)
        path.symlink_to(first)


def gguf_cases(rng: random.Random, tiny_gguf: Path, folder: Path) -> list[dict[str, Any]]:
    folder.mkdir()
    tiny = parse_tiny(tiny_gguf)
    cases = []
    for i in range(GGUF_CASES):
        path = folder / f"g{i}.gguf"
        if rng.random() < 0.08:
            _special_file(rng, path, tiny_gguf)
        else:
            _write_gguf(rng, tiny, path)
        argv = ["plan", str(path)] if i % 2 else ["chat", str(path), "-p", "hi", "--max-tokens", "1"]
        cases.append({"kind": "gguf", "argv": argv})
    return cases


BAD_VALUES: list[Any] = [None, True, -1, 0, 1, 2**31, 2**63, 10**30, 1.5, float("1e308"), "x", "", [], {}, [1] * 40,
                         "(a|aa)*", "\u0000"]  # fmt: skip


def _mutate_plan(rng: random.Random, plan: dict[str, Any], path: Path) -> None:
    choice = rng.randrange(12)
    llama = plan["llama"]
    if choice == 0:
        path.write_bytes(rng.choice([b"", b"{", b"[]", b"null", b"\xff", b"[" * 100000, b'{"schema": 1}']))
        return
    if choice == 1:
        with path.open("wb") as f:
            f.truncate(65 << 20)
        return
    if choice == 2:
        rng.choice([lambda: os.mkfifo(path), lambda: path.symlink_to("/dev/zero"), lambda: path.mkdir()])()
        return
    if choice < 8:
        key = rng.choice(sorted(llama))
        llama[key] = rng.choice(BAD_VALUES)
    elif choice == 8:
        llama["n_threads"] = rng.choice([3, 100, 512, 513, 100000, -4])
    elif choice == 9:
        llama["override_tensor"] = [
            {
                "pattern": rng.choice(["(a*)*b", "(x|xx)+y", "a{1,99}", "[", "x" * 5000, "\\", r"^blk\..*\..*\..*"]),
                "buffer": rng.choice(["CPU", "CUDA0", None]),
            }
        ]
    elif choice == 10:
        llama[rng.choice(["n_ctx", "n_batch", "n_ubatch"])] = rng.choice([1, 2**24 + 1, 2**40, 0])
    else:
        plan[rng.choice(["llama", "schema"])] = rng.choice(BAD_VALUES)
    path.write_text(json.dumps(plan))


def plan_cases(rng: random.Random, plan_file: Path, tiny_gguf: Path, folder: Path) -> list[dict[str, Any]]:
    folder.mkdir()
    cases = []
    for i in range(PLAN_CASES):
        path = folder / f"p{i}.json"
        _mutate_plan(rng, json.loads(plan_file.read_text()), path)
        cases.append(
            {"kind": "plan", "argv": ["chat", str(tiny_gguf), "--plan", str(path), "-p", "hi", "--max-tokens", "1"]}
        )
    return cases


TEMPLATE_PARTS = [
    "{{ 'x' * 10**10 }}", "{{ 'y'|center(10**10) }}", "{{ 'z\n'|indent(10**8) }}", "{{ '%099999999d' % 1 }}",
    "{{ '{:>200000000}'.format(1) }}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% for a in range(99999) %}{% for b in range(300) %}{{ a }}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ ''.__class__.__mro__ }}", "{{ messages.__init__ }}", "{{ undefined_thing.x }}", "{% for %}", "{{",
    "{{ '[' * 100000 | from_json }}", "{{ 'not json' | from_json }}", "{{ messages[10**9] }}", "{{ 1 / 0 }}",
    "{{ range(10**9) | list }}", "{{ messages | tojson(indent=10**8) }}", "{% raw %}", "\x00\xff",
    "{{" + "(" * 3000 + "1" + ")" * 3000 + "}}", "{% for m in messages %}{{ m.content }}{% endfor %}",
]  # fmt: skip


def template_cases(rng: random.Random, tiny_gguf: Path, folder: Path) -> list[dict[str, Any]]:
    folder.mkdir()
    tiny = parse_tiny(tiny_gguf)
    cases = []
    for i in range(TEMPLATE_CASES):
        template = "".join(rng.choice(TEMPLATE_PARTS) for _ in range(rng.randrange(1, 3)))
        h = {
            **tiny,
            "kv": [kv if kv[0] != "tokenizer.chat_template" else (kv[0], STR, template, None) for kv in tiny["kv"]],
        }
        path = folder / f"t{i}.gguf"
        raw = encode(h)
        path.write_bytes(raw)
        with path.open("r+b") as f:  # the real data, so a harmless template chats with the real model
            f.seek(len(raw))
            with tiny_gguf.open("rb") as src:
                src.seek(tiny_gguf.stat().st_size - tiny["data"])
                f.write(src.read())
        cases.append({"kind": "template", "argv": ["chat", str(path), "-p", "hi", "--max-tokens", "1"]})
    return cases


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, symlinks to /dev/zero, rlimits")
def test_fuzzed_plan_and_chat_inputs_fail_cleanly(tiny_gguf: Path, tmp_path: Path, python: str, dsv4) -> None:
    rng = random.Random(SEED)
    plan_file = tmp_path / "plan.json"
    assert dsv4("plan", str(tiny_gguf), "--ram", "8", "-o", str(plan_file)).code == 0
    cases = gguf_cases(rng, tiny_gguf, tmp_path / "gguf")
    cases += plan_cases(rng, plan_file, tiny_gguf, tmp_path / "plans")
    cases += template_cases(rng, tiny_gguf, tmp_path / "templates")
    results = run_cases(python, cases, tmp_path / "fuzz", seconds=30)
    assert len(results) == len(cases) >= 300
    failures = clean_failures(results)
    if os.environ.get("DSV4_FUZZ_DUMP"):
        Path(os.environ["DSV4_FUZZ_DUMP"]).write_text(json.dumps(results))
    assert not failures, json.dumps(failures[:5], indent=1)
    for kind in ("gguf", "plan", "template"):  # the mutations really are damage, mostly
        mine = [r for r in results if r["kind"] == kind]
        assert sum(r["code"] == 1 for r in mine) > 0.6 * len(mine), kind
