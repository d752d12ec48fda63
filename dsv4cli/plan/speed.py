"""The speed model: decode and prefill tokens per second from the bytes each tier serves per token.

See `dsv4cli.plan` for the formulas; the machine figures (and where each came from) are `machine.Machine`.
"""

from __future__ import annotations

import math
from typing import Any

from dsv4cli.engine.kvcache import CSA_RATIO, DEFAULT_KV_TYPE, HCA_RATIO, attention_flops
from dsv4cli.plan.groups import LOOKUP_CLASSES, tensor_class
from dsv4cli.plan.machine import CPU_PREFILL_GFLOPS_PER_THREAD, GPU_TFLOPS, NODES_PER_LAYER, Machine
from dsv4cli.plan.model import Plan, flash_attn

PAGE = 4096


def _kv_read_per_token(plan: Plan) -> int:
    """Cache bytes one decode step reads: the window, the indexer keys, top-k CSA rows and all HCA rows."""
    kv, dims = plan.kv, plan.source.dims
    n_csa_layers = sum(1 for r in dims.compress_ratios if r == CSA_RATIO)
    row = kv.csa_bytes // max(1, n_csa_layers * kv.csa_cells) if n_csa_layers else 0
    topk_rows = n_csa_layers * min(dims.index_topk, kv.csa_cells) * row
    return kv.raw_bytes + kv.indexer_bytes + kv.hca_bytes + topk_rows


def estimate_speed(plan: Plan, machine: Machine) -> dict[str, Any]:
    """Seconds per token (and per prefill chunk) by term.

    Host side per token: a fixed cost and the layers' graph cost, then the weights — llama.cpp's GEMV kernels as
    timed here by calibration (per recipe; bounded by RAM bandwidth when the rates were not measured at these
    threads) — then what is read from disk. GPU side:
    bandwidth, plus an assumed launch cost per graph node. `decode_tok_s` is at the start of a conversation;
    `decode_tok_s_full_ctx` adds reading a full cache and attending over it.
    """
    dims, inputs = plan.source.dims, plan.inputs
    share = dims.n_expert_used / dims.n_expert
    touched = 1 - (1 - share) ** inputs.ubatch
    decode: dict[str, float] = {t.name: 0.0 for t in plan.tiers}
    chunk: dict[str, float] = {t.name: 0.0 for t in plan.tiers}
    host_dense = host_experts = active_params = 0.0
    gpu = any(t.kind == "gpu" and t.weights for t in plan.tiers)
    for spec in plan.source.tensors:
        tier, cls = plan.placement[spec.name], tensor_class(spec.name, dims.n_layer)
        if tier == "skipped":
            continue
        if cls in LOOKUP_CLASSES:
            rows = LOOKUP_CLASSES[cls].rows_per_token(plan.source.facts)
            row_bytes = spec.nbytes // spec.ne[-1]
            read = rows * (max(row_bytes, PAGE) if tier == "disk" else row_bytes)
            decode[tier] += read
            chunk[tier] += read * inputs.ubatch
            continue
        if cls == "token_embd":
            decode[tier] += spec.nbytes // spec.ne[-1]
            continue
        fraction = share if cls == "routed_experts" else 1.0
        decode[tier] += spec.nbytes * fraction
        active_params += math.prod(spec.ne) * fraction
        if tier in ("ram", "disk"):
            if cls == "routed_experts":
                host_experts += spec.nbytes * fraction
            else:
                host_dense += spec.nbytes
        read_once = spec.nbytes * (touched if cls == "routed_experts" else 1.0)
        chunk[tier] += read_once
        if gpu and tier in ("ram", "disk"):
            chunk["pcie"] = chunk.get("pcie", 0.0) + read_once

    # RPC workers hold the lowest offloaded layers (first in llama.cpp's device order); the head is index n_layer
    rpc_count = sum(n for t, n in zip(plan.tiers, plan.gpu_layer_counts, strict=False) if t.kind == "rpc")
    rpc_layers = min(rpc_count, plan.n_gpu_layers and dims.n_layer - (dims.n_layer + 1 - plan.n_gpu_layers))
    gpu_layers = min(plan.n_gpu_layers, dims.n_layer) - rpc_layers
    host_layers = dims.n_layer - gpu_layers - rpc_layers
    bw = {t.name: t.bandwidth_gbs * 1e9 for t in plan.tiers} | {"pcie": machine.pcie_gbs.value * 1e9}
    decode_s = {name: nbytes / bw[name] for name, nbytes in decode.items() if nbytes}
    decode_s["cpu_compute"] = host_dense / (machine.cpu_dense_gbs.value * 1e9) + host_experts / (
        machine.cpu_expert_gbs.value * 1e9
    )
    decode_s["overhead"] = (
        machine.cpu_token_s.value
        + (host_layers + rpc_layers) * machine.cpu_layer_s.value
        + (gpu_layers * NODES_PER_LAYER * machine.gpu_node_s.value)
    )
    network = network_per_token(plan)
    if network:
        decode_s["network"] = sum(rtt + nbytes / bw_net for nbytes, rtt, bw_net in network)
        decode["network"] = sum(nbytes for nbytes, _, _ in network)
    total = sum(v for k, v in decode_s.items() if k not in ("ram", "cpu_compute"))
    # Kernel rates measured here at these threads already stream their weights from this RAM; the RAM roofline
    # bounds only figures that were not (defaults, flags, rates scaled to more threads, a given --ram-bw).
    streamed = machine.cpu_dense_gbs.source == "measured" and machine.ram_gbs.source != "flag"
    total += decode_s["cpu_compute"] if streamed else max(decode_s.get("ram", 0.0), decode_s["cpu_compute"])

    # A full cache: its bytes from the KV tier, and attention over every cell (FLOPs at the prefill rate).
    attention = attention_flops(dims, plan.kv, flash_attn=flash_attn(inputs))
    host_attention = sum(attention[:host_layers])
    cpu_flops = CPU_PREFILL_GFLOPS_PER_THREAD * 1e9 * machine.threads.value
    first_kv = next((t.name for t in plan.tiers if t.kv), "ram")
    full = total + _kv_read_per_token(plan) / bw[first_kv] + host_attention / cpu_flops
    full += (sum(attention) - host_attention) / (GPU_TFLOPS * 1e12)

    chunk_s = {name: nbytes / bw[name] for name, nbytes in chunk.items() if nbytes}
    chunk_s["compute"] = 2 * active_params * inputs.ubatch / (GPU_TFLOPS * 1e12 if gpu else cpu_flops)
    chunk_s["overhead"] = decode_s["overhead"]
    if network:
        chunk_s["network"] = sum(rtt + nbytes * inputs.ubatch / bw_net for nbytes, rtt, bw_net in network)
    return {
        "decode_tok_s": round(1 / total, 3),
        "decode_tok_s_full_ctx": round(1 / full, 3),
        "decode_bottleneck": max(decode_s, key=decode_s.__getitem__),
        "decode_bytes_per_token": {k: int(v) for k, v in decode.items() if v},
        "decode_seconds_per_token": {k: round(v, 6) for k, v in decode_s.items()},
        "prefill_tok_s": round(inputs.ubatch / sum(chunk_s.values()), 2),
        "prefill_bottleneck": max(chunk_s, key=chunk_s.__getitem__),
        "prefill_seconds_per_chunk": {k: round(v, 4) for k, v in chunk_s.items()},
    }


def network_per_token(plan: Plan) -> list[tuple[int, float, float]]:
    """(bytes, round-trip seconds, bytes/s) per RPC worker holding layers, for one decoded token.

    Each worker's block of layers is one graph split. Per token the client sends it the residual stream (f32,
    `hc` copies of the hidden state) and reads the stream (or, on the head's worker, the logits) back, with one
    round trip for the read; between two workers the stream goes through the client (ggml-rpc copies tensors
    directly only within one server). The split's graph inputs go too; the large ones are the K cache's Hadamard
    rotations, one per cache kind its layers use (raw window; CSA with its indexer; HCA), which llama.cpp builds
    for a quantized K cache, and for deepseek4 also when the head size equals the indexer's (llama-kv-cache.cpp).
    Positions, masks and command headers are left out: `bench/rpc.py` measured the total at 1.2x this figure on
    the tiny model.
    """
    dims = plan.source.dims
    stream = dims.hc * dims.hidden * 4
    rotating = plan.inputs.kv_type != DEFAULT_KV_TYPE or dims.head_dim == dims.index_head_dim
    rot, index_rot = (_rotation_bytes(dims.head_dim), _rotation_bytes(dims.index_head_dim)) if rotating else (0, 0)
    first = dims.n_layer + 1 - plan.n_gpu_layers
    workers: dict[str, list[float]] = {}
    for tier, n in zip(plan.tiers, plan.gpu_layer_counts, strict=False):
        layers = [i for i in range(first, first + n) if i < dims.n_layer]
        first += n
        if tier.kind != "rpc" or not n or not tier.endpoint:
            continue
        ratios = {dims.compress_ratios[i] for i in layers}
        rotations = (rot if layers else 0) + (rot if HCA_RATIO in ratios else 0)
        rotations += rot + index_rot if CSA_RATIO in ratios else 0
        out = dims.vocab * 4 if dims.n_layer in range(first - n, first) else stream
        entry = workers.setdefault(tier.endpoint, [0, tier.rtt_s, tier.net_gbs * 1e9])
        entry[0] += stream + out + rotations
    return [(int(b), rtt, bw) for b, rtt, bw in workers.values()]


def _rotation_bytes(head_dim: int) -> int:
    """An f32 Hadamard rotation of the largest power of two (at least 64) dividing the head size."""
    n = 64
    while head_dim % (n * 2) == 0:
        n *= 2
    return n * n * 4
