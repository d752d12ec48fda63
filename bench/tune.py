"""Decode and prefill with llama-server's own defaults, dsv4's untuned defaults and `dsv4 tune`'s settings.

On a generated model at V4-Flash's real widths (`bench_models.REAL_CONFIG`; `--models DIR` keeps it, `--gguf`
measures another file), CPU only: first `dsv4 tune` runs with `--budget` (in a temporary dsv4 home, so the user's
cache is untouched), then the engine build's llama-bench measures each row in turn, `--rounds` times, alternating,
so a busy moment on a shared machine hits every row alike; each row keeps its best round. Rows:

    (a) llama-server's defaults: llama.cpp's own flags (flash attention auto, -ub 512 -b 2048, f16 cache, mmap,
        repacking on), except repacking off where the build has AMX (on: llama.cpp aborts, see llama_lib)
    (b) dsv4's untuned plan (`dsv4 plan --untuned`); (b-) the same with flash attention off, the rule before
        flash attention became the default
    (c) the tuned plan

Goal: (c) at least the best of (a) and (b) on decode and prefill within the noise (the spread of the rounds,
printed), and ahead of (b) where a rule was wrong. The load average is printed before and after: on a shared
machine the figures are only as steady as it.

    .venv/bin/python bench/tune.py [--models DIR] [--gguf F.gguf] [--budget 300] [--rounds 2] [--prompt 512]
                                   [--gen 32] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from bench_models import REAL_CONFIG, make_gguf


def rows(gguf: Path, budget: float, n_prompt: int, n_gen: int) -> dict[str, list[str]]:
    """llama-bench flags (model and sizes aside) of each row, after tuning."""
    from dsv4cli.load.model_file import open_model_file
    from dsv4cli.load.placement import Placement
    from dsv4cli.models.ref import resolve_model
    from dsv4cli.plan import make_plan
    from dsv4cli.system import llama_lib
    from dsv4cli.tune.bench import bench_args
    from dsv4cli.tune.run import plan_for, settings_of, tune_model

    placement = Placement(cpu=True)
    result = tune_model(resolve_model(str(gguf)), placement, budget_s=budget, progress=print)
    print(f"tuned in {result.seconds:.0f} s: {result.search.best.label()}")
    src = open_model_file(gguf).source
    inputs = dataclasses.replace(placement.plan_inputs(), untuned=True)
    untuned = settings_of(make_plan(src, inputs))
    settings = {
        "(b) dsv4 untuned": untuned,
        "(b-) fa off": dataclasses.replace(untuned, flash_attn=False),
        "(c) dsv4 tuned": result.search.best,
    }
    sized = {"n_prompt": n_prompt, "n_gen": n_gen, "reps": 1}
    out = {
        "(a) llama-server defaults": ["-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen), "-r", "1", "-o", "json"]
    }
    if "AMX" in llama_lib.extra_buffer_types():
        out["(a) llama-server defaults"] += ["--repack", "0"]
    for name, s in settings.items():
        out[name] = bench_args(plan_for(src, inputs, s).load_params(), gguf, **sized)
    return out


def measure(binary: Path, args: list[str]) -> tuple[float, float]:
    """(decode, prefill) tok/s of one llama-bench run."""
    import subprocess

    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=1800, errors="replace")
    if proc.returncode:
        raise RuntimeError(f"llama-bench failed: {proc.stderr[-800:]}")
    tests = json.loads(proc.stdout)
    tg = max(t["avg_ts"] for t in tests if t["n_gen"])
    pp = max(t["avg_ts"] for t in tests if t["n_prompt"])
    return tg, pp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="measure this file instead of the generated real-width model")
    parser.add_argument("--models", type=Path, help="keep the generated model here (default: a temp folder)")
    parser.add_argument("--budget", type=float, default=300.0, help="dsv4 tune's budget in seconds")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512, help="prefill test tokens")
    parser.add_argument("--gen", type=int, default=32, help="decode test tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from dsv4cli.toolchain.build import find_engine

    with tempfile.TemporaryDirectory(prefix="dsv4-bench-tune-") as tmp:
        os.environ["DSV4_HOME"] = str(Path(tmp) / "home")
        folder = args.models or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        gguf = args.gguf or make_gguf(folder, "bench-real", REAL_CONFIG)
        binary = find_engine().tool("llama-bench")
        table = rows(gguf, args.budget, args.prompt, args.gen)
        load_before = os.getloadavg()
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in table}
        for r in range(args.rounds):
            for name, flags in table.items():
                runs[name].append(measure(binary, flags))
                print(f"round {r + 1} {name}: decode {runs[name][-1][0]:.2f}, prefill {runs[name][-1][1]:.1f}")
        load_after = os.getloadavg()
    best = {name: (max(t for t, _ in ms), max(p for _, p in ms)) for name, ms in runs.items()}
    spread = {name: max(_spread([t for t, _ in ms]), _spread([p for _, p in ms])) for name, ms in runs.items()}
    report = {"best": best, "spread": spread, "runs": runs, "load": [load_before, load_after], "args": table}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    a, b = best["(a) llama-server defaults"], best["(b) dsv4 untuned"]
    print(f"\nload average {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs)")
    print("| row | decode tok/s | prefill tok/s | decode vs (a) / (b) | prefill vs (a) / (b) | spread |")
    print("|---|---|---|---|---|---|")
    for name, (tg, pp) in best.items():
        print(
            f"| {name} | {tg:.2f} | {pp:.1f} | {tg / a[0]:.2f} / {tg / b[0]:.2f} | {pp / a[1]:.2f} / {pp / b[1]:.2f} "
            f"| {spread[name] * 100:.0f} % |"
        )


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / max(values)


if __name__ == "__main__":
    sys.exit(main())
