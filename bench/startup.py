"""Benchmark `dsv4 --help` start-up against a bare `python -c pass`, and list the heavy modules it imports.

Run: .venv/bin/python bench/startup.py [--runs 10]

Each command runs `--runs` times in a fresh interpreter, alternating, best run kept (start-up is noise-prone on a
shared machine; the best run is what the code costs). Goal (issue 17): `dsv4 --help` under 0.3 s, importing none
of numpy, gguf, llama_cpp or jinja2 (about half of start-up when they are loaded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("numpy", "gguf", "llama_cpp", "jinja2")
HELP = (
    "import sys, runpy; sys.argv = ['dsv4', '--help']\n"
    "try:\n    runpy.run_module('dsv4cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
)


def best_seconds(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    bare = best_seconds([sys.executable, "-c", "pass"], args.runs)
    dsv4 = best_seconds([sys.executable, "-m", "dsv4cli", "--help"], args.runs)
    probe = HELP + f"print(sorted(set({HEAVY!r}) & set(sys.modules)), file=sys.stderr)"
    heavy = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True).stderr
    result = {
        "python_pass_s": round(bare, 3),
        "dsv4_help_s": round(dsv4, 3),
        "dsv4_own_s": round(dsv4 - bare, 3),
        "heavy_modules": json.loads(heavy.strip().splitlines()[-1].replace("'", '"')),
        "goal_s": 0.3,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
