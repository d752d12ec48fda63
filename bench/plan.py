"""How close `dsv4 plan` is to what llama.cpp really allocates and how fast it really decodes, on this machine.

Models: the tiny model (its context limit raised to 64k) and a generated deepseek4 model at V4-Flash's real widths
(hidden 4096, 64 heads x 512, q/o LoRA 1024, 8 output groups, expert width 2048; 3 layers, 8 experts; ~760 MB),
both converted by `dsv4 quantize`'s converter with the default recipe (MXFP4 experts, Q8_0 dense). `--models DIR`
keeps them between runs. First the plan's machine terms are measured as `dsv4 plan --calibrate` does (RAM and disk
bandwidth, llama.cpp's kernels on four small models; skipped with `--decode 0`). Then for each model and context a
child process loads the file with llama-cpp-python (verbose, swa_full off, CPU, flash attention on as the plan
chooses; `--no-flash-attn` plans and loads without it), decodes as the calibration does
(`calibrate.decode_seconds`: best chunk, CPU time on one thread), and the parent parses the buffer sizes llama.cpp
logs:

    model   = "CPU_Mapped model buffer size" (whole file, mmap) vs the plan's file bytes
    kv      = every "KV buffer size" + "DSV4 ... state buffer size" vs the plan's KV bytes
    compute = "CPU compute buffer size" vs the plan's compute estimate
    decode  = tokens/s of the child's decode vs the plan's decode_tok_s (a short context, as measured)

Goals: bytes within 5 % (an underestimate is an OOM), decode within +-25 %.

    .venv/bin/python bench/plan.py [--models DIR] [--ctx 4096,32768] [--decode 0] [--gguf F.gguf] [--no-flash-attn]
                                   [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_models import REAL_CONFIG, make_gguf

MIB = 2**20
THREADS = 1  # one thread: on a shared 2-core box a second OpenMP thread mostly waits at barriers
BUFFER_RE = {
    "model": re.compile(r"CPU_Mapped model buffer size =\s*([\d.]+) MiB"),
    "kv": re.compile(r"(?:KV buffer size|state buffer size) =\s*([\d.]+) MiB"),
    "compute": re.compile(r"CPU compute buffer size =\s*([\d.]+) MiB"),
}


def child(path: str, n_ctx: int, n_ubatch: int, n_decode: int, flash_attn: bool) -> None:
    """Load (and optionally decode) in this process; the parent reads stderr."""
    from llama_cpp import Llama

    from dsv4cli.plan.calibrate import decode_seconds
    from dsv4cli.system.llama_lib import apply_to_llama_class

    apply_to_llama_class()  # the repacking choice dsv4 makes (off on AMX CPUs)
    llm = Llama(
        path,
        n_ctx=n_ctx,
        n_batch=n_ubatch,
        n_ubatch=n_ubatch,
        swa_full=False,
        verbose=True,
        n_threads=THREADS,
        flash_attn=flash_attn,
    )
    if n_decode:
        print(f"DECODE_TOK_S {1 / decode_seconds(llm, threads=THREADS)}", file=sys.stderr)


def reported(path: Path, n_ctx: int, n_ubatch: int, n_decode: int = 0, flash_attn: bool = True) -> dict[str, float]:
    """Buffer bytes (and decode tok/s) llama.cpp reports for this file, from a child process."""
    argv = [sys.executable, __file__, "--child", str(path), str(n_ctx), str(n_ubatch), str(n_decode)]
    argv.append("1" if flash_attn else "0")
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=900)
    if proc.returncode:
        raise RuntimeError(f"llama.cpp failed on {path} (rc {proc.returncode}): {proc.stderr[-2000:]}")
    result = {key: sum(float(v) for v in rx.findall(proc.stderr)) * MIB for key, rx in BUFFER_RE.items()}
    decode = re.search(r"DECODE_TOK_S ([\d.]+)", proc.stderr)
    if decode:
        result["decode_tok_s"] = float(decode.group(1))
    return result


def calibrate() -> None:
    """Measure the machine terms once for this run (bandwidths and kernels, at the bench's thread count)."""
    from dsv4cli.home import dsv4_home
    from dsv4cli.plan.calibrate import calibration
    from dsv4cli.system.hardware import measured_bandwidths

    home = dsv4_home()
    bw = measured_bandwidths(home, remeasure=True)
    cal = calibration(home, experts="mxfp4", dense="q8_0", threads=THREADS, remeasure=True)
    print(
        f"calibration: RAM {bw.ram_gbs:.1f} GB/s, disk {bw.disk_gbs:.1f} GB/s, dense GEMV {cal.dense_gbs:.1f} GB/s, "
        f"expert GEMV {cal.expert_gbs:.1f} GB/s, {cal.layer_s * 1e3:.2f} ms per layer, {cal.token_s * 1e3:.2f} ms per "
        f"token ({THREADS} thread)",
        file=sys.stderr,
    )


def compare(path: Path, n_ctx: int, n_ubatch: int, n_decode: int, flash_attn: bool = True) -> dict[str, float]:
    from dsv4cli.plan import PlanInputs, make_plan

    inputs = PlanInputs(
        vram_gib=(), ram_gib=64, ctx=n_ctx, ubatch=n_ubatch, threads=THREADS, flash_attn=flash_attn, untuned=True
    )
    plan = make_plan(str(path), inputs)
    got = reported(path, n_ctx, n_ubatch, n_decode, flash_attn)
    planned = {
        "model": sum(s.nbytes for s in plan.source.tensors),
        "kv": plan.kv.total,
        "compute": plan.compute_host,
    }
    row = {"file": path.name, "n_ctx": n_ctx, "n_ubatch": n_ubatch, "flash_attn": flash_attn}
    for key, value in planned.items():
        row[f"{key}_planned"] = value
        row[f"{key}_reported"] = got[key]
        row[f"{key}_ratio"] = value / got[key]
    row["total_ratio"] = sum(planned.values()) / sum(got[k] for k in planned)
    if n_decode:
        row["decode_predicted"] = plan.estimates["decode_tok_s"]
        row["decode_measured"] = got["decode_tok_s"]
        row["decode_ratio"] = plan.estimates["decode_tok_s"] / got["decode_tok_s"]
    return row


def bench_models(folder: Path, given: list[Path]) -> list[Path]:
    """The files to measure: those given, else the tiny model and the real-width one."""
    from dsv4cli.models.registry import get_model

    if given:
        return list(given)
    tiny = {**get_model("tiny").config, "max_position_embeddings": 65536}
    return [make_gguf(folder, "bench-tiny", tiny), make_gguf(folder, "bench-real", REAL_CONFIG)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, action="append", default=[], help="plan these files instead")
    parser.add_argument("--models", type=Path, help="keep the generated models here (default: a temp folder)")
    parser.add_argument("--ctx", default="4096,32768")
    parser.add_argument("--ubatch", type=int, default=512)
    parser.add_argument("--decode", type=int, default=1, help="1: calibrate and check decode speed; 0: bytes only")
    parser.add_argument("--no-flash-attn", action="store_true", help="plan and load with flash attention off")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsv4-bench-plan-") as tmp:
        folder = args.models or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = bench_models(folder, args.gguf)
        if args.decode:
            calibrate()
        for path in files:
            for n_ctx in (int(c) for c in args.ctx.split(",")):
                rows.append(compare(path, n_ctx, args.ubatch, args.decode, not args.no_flash_attn))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| model | ctx | decode tok/s planned / measured | compute MiB | KV MiB | model MiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [
            f"{row[f'{k}_planned'] / MIB:.1f} / {row[f'{k}_reported'] / MIB:.1f} ({row[f'{k}_ratio']:.3f})"
            for k in ("compute", "kv", "model")
        ]
        decode = "-"
        if "decode_ratio" in row:
            decode = f"{row['decode_predicted']:.1f} / {row['decode_measured']:.1f} ({row['decode_ratio']:.2f})"
        print(f"| {row['file']} | {row['n_ctx']} | {decode} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
