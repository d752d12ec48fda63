"""Benchmark `dsv4 plan REPO:TAG` before a download: bytes and requests to read the headers of a real-sized
pre-quantized GGUF over HTTP range requests, against the header size itself (the least any reader can fetch)
and the download it stands for.

The GGUF is DeepSeek-V4-Flash's as `dsv4 quantize` lays it out (every tensor of the real shapes and types,
`quant.mapping`), with a vocabulary of the real size (129,280 tokens, as many merges), split into 3 shards like
unsloth's; only the headers are written, the tensor data is a sparse hole, so the files take no disk. They are
served by the in-process Hub-compatible server (tests/hub_server.py).

Usage: .venv/bin/python bench/remote_plan.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hub_server import HubServer  # noqa: E402

REPO, TAG, SHARDS = "bench-org/DeepSeek-V4-Flash-GGUF", "UD-Q2_K_XL", 3


def write_headers(folder: Path) -> tuple[int, int]:
    """The shards' headers with sparse data; (header bytes, file bytes) over all shards."""
    import gguf

    from dsv4cli.models.registry import get_model
    from quant.gguf_keys import ARCHITECTURE
    from quant.mapping import gguf_metadata, gguf_tensor_specs

    config = get_model("deepseek-v4-flash").hf_config()
    specs = gguf_tensor_specs(config)
    vocab = config["vocab_size"]
    header = total = 0
    for i in range(SHARDS):
        path = folder / f"DeepSeek-V4-Flash-{TAG}-{i + 1:05d}-of-{SHARDS:05d}.gguf"
        writer = gguf.GGUFWriter(path, "deepseek4")
        writer.add_uint16("split.no", i)
        writer.add_uint16("split.count", SHARDS)
        if i == 0:
            for key, value, vtype, sub in gguf_metadata(config):
                if key != ARCHITECTURE:
                    writer.add_key_value(key, value, vtype, sub)
            writer.add_tokenizer_model("gpt2")
            writer.add_token_list([f"tok{n:06d}" for n in range(vocab)])
            writer.add_token_types([1] * vocab)
            writer.add_token_merges([f"t{n} k{n}" for n in range(vocab)])
        for spec in specs[i::SHARDS]:
            writer.add_tensor_info(
                spec.name, tuple(reversed(spec.ne)), np.dtype(np.float32), spec.nbytes, spec.ggml_type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        size = path.stat().st_size
        data = sum(-(-s.nbytes // 32) * 32 for s in specs[i::SHARDS])  # each tensor padded to the alignment
        start = -(-size // 32) * 32  # the data section starts at the alignment
        os.truncate(path, start + data)  # a hole: the data is never read
        header, total = header + size, total + start + data
    return header, total


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dsv4-bench-") as tmp:
        repo = Path(tmp) / "repo"
        (repo / TAG).mkdir(parents=True)
        header, total = write_headers(repo / TAG)
        os.environ["DSV4_HOME"] = str(Path(tmp) / "home")
        with HubServer(repo, REPO) as hub:
            os.environ["HF_ENDPOINT"] = hub.url
            from dsv4cli.hub.remote_file import FetchBudget
            from dsv4cli.models.registry import get_model
            from dsv4cli.plan import PlanInputs, make_plan
            from dsv4cli.plan.remote import remote_source

            budget = FetchBudget()
            started = time.perf_counter()
            source = remote_source(get_model(REPO), TAG, budget=budget)
            seconds = time.perf_counter() - started
            plan = make_plan(source, PlanInputs(vram_gib=(24.0,), ram_gib=128.0))
    print(
        f"download {total / 1e9:.1f} GB in {SHARDS} shards, headers {header / 1e6:.2f} MB, "
        f"{len(source.tensors)} tensors"
    )
    print(
        f"fetched {budget.fetched / 1e6:.2f} MB in {budget.requests} range requests, {seconds:.2f} s on 127.0.0.1: "
        f"{budget.fetched / header:.2f}x the header bytes, {budget.fetched / total:.2e} of the download"
    )
    print(f"plan: {plan.verdict}")


if __name__ == "__main__":
    main()
