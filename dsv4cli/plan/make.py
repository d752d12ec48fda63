"""`make_plan`: the steps of a plan in order (source, budgets, GPU layers, host RAM, disk, speed)."""

from __future__ import annotations

import dataclasses

from dsv4cli import hardware, llama_lib
from dsv4cli.errors import PlanError
from dsv4cli.kvcache import compute_buffer_bytes, kv_cache
from dsv4cli.model_ref import ModelRef
from dsv4cli.plan.groups import group_layers, layer_of, tensor_class
from dsv4cli.plan.model import DEFAULT_CTX, Plan, PlanInputs, Tier, flash_attn
from dsv4cli.plan.placement import (
    check_inputs,
    fill_gpus,
    fill_host,
    fit_gpu_layers,
    gpu_tiers,
    place_fixed,
    rpc_tiers,
)
from dsv4cli.plan.source import ModelSource, load_source
from dsv4cli.plan.speed import bandwidths, estimate_speed, verdict
from dsv4cli.units import GIB, gib
from quant.arch import V41

V41_WARNING = (
    "deepseek41 (V4.1) does not load in the bundled llama.cpp; this plan is for a fork with Engram support "
    "and its KV cache is a best guess"
)


def make_plan(source: ModelSource | ModelRef | str, inputs: PlanInputs) -> Plan:
    """Place every tensor and estimate speed; raises PlanError when the model cannot run within the budgets."""
    src = source if isinstance(source, ModelSource) else load_source(source, inputs)
    dims, n_layer = src.dims, src.dims.n_layer
    inputs = dataclasses.replace(
        inputs,
        ctx=min(DEFAULT_CTX, dims.context_length) if inputs.ctx is None else inputs.ctx,
        threads=hardware.cpu_threads() if inputs.threads is None else inputs.threads,
    )
    check_inputs(inputs, dims)
    groups = group_layers(src.tensors, n_layer)
    kv = kv_cache(dims, n_ctx=inputs.ctx, n_ubatch=inputs.ubatch, kv_type=inputs.kv_type)
    warnings = [V41_WARNING] if dims.arch == V41 else []

    # 1. Devices, RPC workers first as llama.cpp orders them: whole layers (weights + KV; with workers, experts
    #    too) from the top down, then whole expert layers while they fit.
    local_gpus, vram_source = gpu_tiers(inputs)
    devices = [*rpc_tiers(inputs), *local_gpus]
    bw = bandwidths(inputs)
    compute_gpu = compute_buffer_bytes(dims, n_ctx=inputs.ctx, n_ubatch=inputs.ubatch, flash_attn=True)
    # A worker computes on its own backend, a CPU one as the host does (the calibrated CPU buffer), plus the
    # logits of a micro-batch where it holds the head (counted on every worker: it errs safe, as the worker's
    # budget is a hard limit). Measured on the tiny model: 1.6 MiB and 4.0 MiB (head) against 5.5 MiB each.
    compute_rpc = compute_buffer_bytes(dims, n_ctx=inputs.ctx, n_ubatch=inputs.ubatch, flash_attn=False)
    compute_rpc += inputs.ubatch * dims.vocab * 4
    computes = [compute_rpc if d.kind == "rpc" else compute_gpu for d in devices]
    fitted = fit_gpu_layers(devices, groups, kv, computes, n_layer) if devices else None
    if devices and fitted is None:
        warnings.append("no layer fits in VRAM next to the compute buffer; planning CPU-only")
    ngl, gpu_layers = fitted or (0, [[] for _ in devices])
    local_layers = sum(len(ls) for g, ls in zip(devices, gpu_layers, strict=True) if g.kind == "gpu")
    if warning := llama_lib.offload_warning(local_layers, vram_source):
        warnings.append(warning)
    layer_tier = {layer: devices[gi].name for gi, layers in enumerate(gpu_layers) for layer in layers}
    used_devices = [g for g, layers in zip(devices, gpu_layers, strict=True) if layers]
    gpu_experts = fill_gpus(devices, layer_tier, groups, kv, computes, n_layer)

    # 2. Host RAM: what must be resident (embedding, host layers, their KV, the compute buffer) or it fails.
    ram_budget = int(inputs.ram_gib * GIB) if inputs.ram_gib is not None else hardware.available_ram()
    ram = Tier("ram", "ram", "host RAM", ram_budget, bw["ram"])
    disk = Tier("disk", "disk", "mmap from disk", None, bw["disk"])
    host_layers = [i for i in range(n_layer) if i not in layer_tier]
    ram.kv = sum(kv.per_layer[i] for i in host_layers)
    ram.compute = _host_compute(src, inputs, gpu=any(d.kind == "gpu" for d in used_devices))
    ram.weights = groups.host_fixed + sum(groups.dense[i] for i in host_layers)
    ram.weights += groups.root_gpu if n_layer not in layer_tier else 0
    if ram.used > ram.budget:
        raise PlanError(
            f"does not fit: host RAM needs {gib(ram.used)} for the embedding, host layers, KV and compute buffer "
            f"but has {gib(ram.budget)} (short by {gib(ram.used - ram.budget)})",
            hint="use a shorter --ctx, a smaller recipe (--dense q4_k / --experts q4_0), more --vram, or more RAM",
        )

    # 3. Routed experts left on the host, then Engram tables, into RAM; the rest is memory-mapped from disk.
    host_experts = [
        (s.name, s.nbytes)
        for s in src.tensors
        if tensor_class(s.name, src.dims.n_layer) == "routed_experts" and layer_of(s.name) not in gpu_experts
    ]
    placement = fill_host(ram, disk, [*host_experts, *groups.engram])
    if disk.weights and inputs.no_disk:
        raise PlanError(
            f"does not fit without disk: host RAM is short by {gib(disk.weights)} "
            f"({gib(ram.budget)} budget, {gib(ram.used + disk.weights)} needed)",
            hint="allow memory-mapping from disk (drop --no-disk), use a smaller --experts recipe, or add RAM",
        )
    if disk.weights:
        warnings.append(
            f"{gib(disk.weights)} of weights do not fit in RAM and will be memory-mapped from disk "
            f"(counted at {bw['disk']:g} GB/s in the estimate)"
        )
    place_fixed(src, placement, layer_tier)

    # 4. Speed.
    plan = Plan(
        source=src,
        inputs=inputs,
        tiers=[*devices, ram, disk],
        placement=placement,
        kv=kv,
        compute_gpu=compute_gpu if used_devices else 0,
        compute_host=ram.compute,
        n_gpu_layers=ngl,
        gpu_layer_counts=[len(layers) for layers in gpu_layers] if used_devices else [],
        cpu_expert_layers=sorted(i for i in layer_tier if i < n_layer and i not in gpu_experts),
        estimates={},
        warnings=warnings,
        verdict="",
        vram_source=vram_source,
        ram_source="flag" if inputs.ram_gib is not None else "available",
    )
    plan.estimates = estimate_speed(plan, bw)
    plan.verdict = verdict(plan)
    return plan


def _host_compute(src: ModelSource, inputs: PlanInputs, *, gpu: bool) -> int:
    """CPU-only: the calibrated buffer. Beside a GPU, llama.cpp's host buffer holds the residual stream and logits
    for the host-side ops (an uncalibrated estimate: no GPU on the calibration machine).
    """
    dims = src.dims
    if not gpu:
        fa = flash_attn(inputs, gpu=False)
        return compute_buffer_bytes(dims, n_ctx=inputs.ctx, n_ubatch=inputs.ubatch, flash_attn=fa)
    return inputs.ubatch * dims.hc * dims.hidden * 4 * 2 + inputs.ubatch * dims.vocab * 4
