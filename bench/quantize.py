"""Benchmark `dsv4 quantize` streaming: source MB/s against a plain sequential read, and peak RSS.

Writes a ~2 GB checkpoint in the official layout (the tiny writer with bigger dimensions: one layer per shard,
FP4 experts, FP8 dense, BF16 embeddings), then in the same run
  1. reads every shard file sequentially (the I/O baseline), and
  2. converts it with the default recipe (or, with --fitted, measures and writes a `--size` mix halfway between
     the smallest mix and lossless: K-quants through ggml) in a subprocess whose peak RSS is taken from the kernel.
Page-cache state is the same for both (caches are dropped before each when running as root).
Goals: quantize >= 0.6x the baseline's MB/s; peak RSS < 1.5 GB.

Usage: python bench/quantize.py [--dir /tmp/dsv4-bench] [--keep] [--fitted]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_CONFIG = {
    "hidden_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "head_dim": 128,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 512,
    "o_lora_rank": 512,
    "o_groups": 4,
    "moe_intermediate_size": 1024,
    "n_routed_experts": 64,
    "num_experts_per_tok": 4,
    "vocab_size": 512,  # the tiny tokenizer learns ~480 merges; embeddings are not what this measures
    "index_n_heads": 4,
    "index_head_dim": 64,
    "index_topk": 64,
    "num_hash_layers": 1,
    "max_position_embeddings": 4096,
    "num_nextn_predict_layers": 0,
    "compress_ratios": [0, 0, 4, 128, 4, 128, 4, 128],
}
CONVERT = """
import sys
from pathlib import Path
from dsv4cli.models.fit import fit_measured, measure_fit
from quant.allocate import size_range
from quant.convert import QuantOptions, quantize_checkpoint
options = QuantOptions()
if sys.argv[3] == "fitted":  # `quantize --size` halfway between the smallest mix and lossless: measure, then write
    measured = measure_fit(Path(sys.argv[1]), options, None)
    smallest, _ = size_range(measured.options, measured.fixed)
    options = fit_measured(measured, (smallest + measured.lossless) // 2, options).options
r = quantize_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), options)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(r.source_bytes, r.seconds, int(hwm.split()[1]) * 1024)
"""


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sequential_read(files: list[Path]) -> tuple[int, float]:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total, start = 0, time.perf_counter()
    for path in files:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/dsv4-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint for another run")
    parser.add_argument("--repeat", type=int, default=3, help="measurements of each (medians are compared)")
    parser.add_argument("--fitted", action="store_true", help="convert with --size (halfway to lossless) instead")
    args = parser.parse_args()
    from dsv4cli.models.registry import ModelSpec
    from dsv4cli.models.tiny import write_tiny_checkpoint

    folder, out = args.dir / "bench-ckpt", args.dir / "bench.gguf"
    if not (folder / "config.json").is_file():
        started = time.perf_counter()
        spec = ModelSpec(name="bench", builtin=True, expert_dtype="fp4", config=BENCH_CONFIG)
        write_tiny_checkpoint(spec, folder, max_params=None)
        print(f"generated checkpoint in {time.perf_counter() - started:.0f} s")
    shards = sorted(folder.glob("*.safetensors"))
    read_rates, quant_rates, peaks = [], [], []
    cold = False
    for _ in range(args.repeat):  # alternate the two so both see the same machine load
        cold = drop_caches()
        read_bytes, read_s = sequential_read(shards)
        read_rates.append(read_bytes / read_s / 1e6)
        out.unlink(missing_ok=True)
        drop_caches()
        argv = [sys.executable, "-c", CONVERT, str(folder), str(out), "fitted" if args.fitted else "lossless"]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        # VmHWM of the converter's own address space: ru_maxrss of a child would include this (larger) parent's
        # pages from before exec.
        source_bytes, quant_s, peak_rss = (float(v) for v in proc.stdout.split())
        quant_rates.append(source_bytes / quant_s / 1e6)
        peaks.append(peak_rss)
    ratios = [q / r for q, r in zip(quant_rates, read_rates, strict=True)]
    result = {
        "checkpoint_bytes": read_bytes,
        "runs": args.repeat,
        "page_cache": "dropped before each run" if cold else "warm (not root)",
        "sequential_read_MBps": [round(r, 1) for r in read_rates],
        "quantize_source_MBps": [round(q, 1) for q in quant_rates],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_goal": 0.6,
        "peak_rss_MB_max": round(max(peaks) / 1e6, 1),
        "peak_rss_goal_MB": 1500,
        "conversion": "fitted (--size)" if args.fitted else "lossless",
        "gguf_bytes": out.stat().st_size,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    out.unlink(missing_ok=True)
    out.with_name(out.name + ".report.json").unlink(missing_ok=True)
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
