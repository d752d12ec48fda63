"""Decode speed with llama.cpp's extra buffer types (weight repacking) on versus off, on this machine.

The baseline is the same GGUF loaded with `use_extra_bufts` off (what dsv4 does automatically on AMX CPUs, and
what `DSV4_REPACK=off` forces). Each round loads the file in a fresh child process per setting, alternating the
order, prefills a short prompt and times greedy decode through dsv4's own engine; the figure is the median over
rounds and the ratio is on / off (above 1: repacking helps). The child also reports which buffer types held the
weights, from llama.cpp's log.

    .venv/bin/python bench/repack.py [--big] [--rounds 3] [--decode 64] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from plan import bench_models  # bench/plan.py: the same generated models

PROMPT = "<｜begin▁of▁sentence｜><｜User｜>Tell me a long story.<｜Assistant｜></think>"


def child(path: str, setting: str, n_decode: int, threads: int) -> None:
    """Load with extra buffer types `setting` (on/off), decode, print tok/s; the log goes to stderr."""
    from dsv4cli.engine import LoadParams, SampleOptions
    from dsv4cli.engine.inprocess import LlamaEngine

    params = LoadParams(n_ctx=2048, n_threads=threads, use_extra_bufts=setting == "on")
    engine = LlamaEngine(Path(path), params, verbose=True)
    *_, stats = engine.stream(PROMPT, SampleOptions(max_tokens=n_decode, temp=0))
    print(json.dumps({"decode_tok_s": stats.decode_tps, "tokens": stats.generated_tokens}))


def measure(path: Path, setting: str, n_decode: int, threads: int) -> dict:
    argv = [sys.executable, __file__, "--child", str(path), setting, str(n_decode), str(threads)]
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{path.name} with extra buffer types {setting} failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["buffers"] = sorted(set(re.findall(r"(\w+) model buffer size", proc.stderr)))
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, action="append", default=[], help="measure these files instead")
    parser.add_argument("--big", action="store_true", help="also a ~1.5 GB generated deepseek4 model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from dsv4cli.system import llama_lib

    rows = []
    with tempfile.TemporaryDirectory(prefix="dsv4-bench-repack-") as tmp:
        for path in bench_models(Path(tmp), args.gguf, big=args.big):
            runs: dict[str, list[dict]] = {"on": [], "off": []}
            for i in range(args.rounds):
                for setting in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    runs[setting].append(measure(path, setting, args.decode, args.threads))
            row = {"file": path.name, "extra_buffer_types": list(llama_lib.extra_buffer_types())}
            for setting, results in runs.items():
                row[f"{setting}_tok_s"] = statistics.median(r["decode_tok_s"] for r in results)
                row[f"{setting}_buffers"] = results[0]["buffers"]
                row[f"{setting}_tokens"] = results[0]["tokens"]
            row["ratio_on_off"] = row["on_tok_s"] / row["off_tok_s"]
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(
            f"{row['file']}: decode on {row['on_tok_s']:.1f} tok/s ({', '.join(row['on_buffers'])}) / "
            f"off {row['off_tok_s']:.1f} tok/s ({', '.join(row['off_buffers'])}) = {row['ratio_on_off']:.2f}x "
            f"over {args.rounds} rounds of {row['on_tokens']} tokens, {args.threads} threads"
        )


if __name__ == "__main__":
    main()
