"""How close `dsv4 plan` is to what llama.cpp really allocates and how fast it really decodes, on this machine.

For each GGUF (default: the tiny model, quantized into a temp folder; `--big` adds a ~1.5 GB generated deepseek4
model) and each context length, a child process loads the file with llama-cpp-python (verbose, swa_full off,
CPU) and the parent parses the buffer sizes llama.cpp logs:

    model   = "CPU_Mapped model buffer size" (whole file, mmap) vs the plan's file bytes
    kv      = every "KV buffer size" + "DSV4 ... state buffer size" vs the plan's KV bytes
    compute = "CPU compute buffer size" vs the plan's compute estimate

and prints planned / reported. With `--decode N` the child also generates N tokens; the parent measures host RAM
bandwidth right before (same machine, same moment) and compares the plan's predicted decode tok/s. Goals: bytes
within 2 % (fail above 5 %), decode within ±30 %.

    .venv/bin/python bench/plan.py [--big] [--ctx 1024,4096] [--decode 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20
THREADS = 1  # one thread: on a shared 2-core box a second OpenMP thread mostly waits at barriers
BUFFER_RE = {
    "model": re.compile(r"CPU_Mapped model buffer size =\s*([\d.]+) MiB"),
    "kv": re.compile(r"(?:KV buffer size|state buffer size) =\s*([\d.]+) MiB"),
    "compute": re.compile(r"CPU compute buffer size =\s*([\d.]+) MiB"),
}
BIG_CONFIG = {
    "hidden_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "head_dim": 256,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 512,
    "o_lora_rank": 512,
    "o_groups": 4,
    "moe_intermediate_size": 1024,
    "n_routed_experts": 48,
    "num_experts_per_tok": 6,
    "vocab_size": 512,
    "index_n_heads": 8,
    "index_head_dim": 128,
    "index_topk": 64,
    "sliding_window": 128,
    "num_hash_layers": 2,
    "max_position_embeddings": 65536,
    "compress_ratios": [0, 0, 4, 128, 4, 128, 4, 128, 0],
}


def child(path: str, n_ctx: int, n_ubatch: int, n_decode: int) -> None:
    """Load (and optionally decode) in this process; the parent reads stderr."""
    from llama_cpp import Llama

    from dsv4cli.llama_lib import apply_to_llama_class

    apply_to_llama_class()  # the repacking choice dsv4 makes (off on AMX CPUs)
    llm = Llama(path, n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, swa_full=False, verbose=True, n_threads=THREADS)
    if n_decode:
        llm.eval(llm.tokenize(b"The quick brown fox", add_bos=False))
        start = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([llm.sample(temp=0.0)])
        print(f"DECODE_TOK_S {n_decode / (time.perf_counter() - start)}", file=sys.stderr)


def reported(path: Path, n_ctx: int, n_ubatch: int, n_decode: int = 0) -> dict[str, float]:
    """Buffer bytes (and decode tok/s) llama.cpp reports for this file, from a child process."""
    argv = [sys.executable, __file__, "--child", str(path), str(n_ctx), str(n_ubatch), str(n_decode)]
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=900)
    if proc.returncode:
        raise RuntimeError(f"llama.cpp failed on {path} (rc {proc.returncode}): {proc.stderr[-2000:]}")
    result = {key: sum(float(v) for v in rx.findall(proc.stderr)) * MIB for key, rx in BUFFER_RE.items()}
    decode = re.search(r"DECODE_TOK_S ([\d.]+)", proc.stderr)
    if decode:
        result["decode_tok_s"] = float(decode.group(1))
    return result


def compare(path: Path, n_ctx: int, n_ubatch: int, n_decode: int) -> dict[str, float]:
    from dsv4cli.hardware import measure_ram_bandwidth
    from dsv4cli.plan import PlanInputs, make_plan

    ram_bw = measure_ram_bandwidth() if n_decode else None
    plan = make_plan(
        str(path), PlanInputs(vram_gib=(), ram_gib=64, ctx=n_ctx, ubatch=n_ubatch, ram_bw=ram_bw, threads=THREADS)
    )
    got = reported(path, n_ctx, n_ubatch, n_decode)
    planned = {
        "model": sum(s.nbytes for s in plan.source.tensors),
        "kv": plan.kv.total,
        "compute": plan.compute_host,
    }
    row = {"file": path.name, "n_ctx": n_ctx, "n_ubatch": n_ubatch}
    for key, value in planned.items():
        row[f"{key}_planned"] = value
        row[f"{key}_reported"] = got[key]
        row[f"{key}_ratio"] = value / got[key]
    total_planned, total_reported = sum(planned.values()), sum(got[k] for k in planned)
    row["total_ratio"] = total_planned / total_reported
    if n_decode:
        row["ram_bw_gbs"] = ram_bw
        row["decode_predicted"] = plan.estimates["decode_tok_s"]
        row["decode_measured"] = got["decode_tok_s"]
        row["decode_ratio"] = plan.estimates["decode_tok_s"] / got["decode_tok_s"]
    return row


def make_gguf(folder: Path, name: str, config: dict | None) -> Path:
    """The tiny model (or a bigger generated one) written as a checkpoint and quantized with the default recipe."""
    from dsv4cli.registry import ModelSpec, get_model
    from dsv4cli.tiny import write_tiny_checkpoint
    from quant.convert import QuantOptions, quantize_checkpoint

    spec = get_model("tiny") if config is None else ModelSpec(name=name, builtin=True, config=config)
    out = folder / f"{name}.gguf"
    write_tiny_checkpoint(spec, folder / name)
    quantize_checkpoint(folder / name, out, QuantOptions())
    return out


def bench_models(folder: Path, given: list[Path], *, big: bool) -> list[Path]:
    """The files to measure: those given, else the tiny model (and with `big` a generated ~1.5 GB one)."""
    if given:
        return list(given)
    files = [make_gguf(folder, "tiny", None)]
    if big:
        files.append(make_gguf(folder, "bench-big", BIG_CONFIG))
    return files


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, action="append", default=[], help="plan these files instead")
    parser.add_argument("--big", action="store_true", help="also generate and check a ~1.5 GB model")
    parser.add_argument("--ctx", default="1024,4096")
    parser.add_argument("--ubatch", type=int, default=512)
    parser.add_argument("--decode", type=int, default=0, help="tokens to generate for the speed check")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsv4-bench-plan-") as tmp:
        for path in bench_models(Path(tmp), args.gguf, big=args.big):
            for n_ctx in (int(c) for c in args.ctx.split(",")):
                rows.append(compare(path, n_ctx, args.ubatch, args.decode))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        figures = "  ".join(
            f"{k} {row[f'{k}_planned'] / MIB:.2f}/{row[f'{k}_reported'] / MIB:.2f} MiB ({row[f'{k}_ratio']:.3f})"
            for k in ("model", "kv", "compute")
        )
        line = f"{row['file']} ctx {row['n_ctx']}: {figures}  total {row['total_ratio']:.3f}"
        if "decode_ratio" in row:
            line += (
                f"  decode {row['decode_predicted']:.1f} predicted / {row['decode_measured']:.1f} measured tok/s "
                f"({row['decode_ratio']:.2f}, RAM {row['ram_bw_gbs']:.1f} GB/s)"
            )
        print(line)


if __name__ == "__main__":
    main()
