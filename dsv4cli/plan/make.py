"""`make_plan`: the steps of a plan in order (source, budgets, GPU layers, host RAM, disk, speed)."""

from __future__ import annotations

import dataclasses

from dsv4cli.engine.kvcache import compute_buffer_bytes, kv_cache
from dsv4cli.errors import PlanError, UsageError
from dsv4cli.models.ref import ModelRef
from dsv4cli.plan.groups import group_layers, layer_of, tensor_class
from dsv4cli.plan.inputs import DEFAULT_CTX, PlanInputs
from dsv4cli.plan.machine import Figure, assumptions, resolve_machine
from dsv4cli.plan.model import Plan, Tier, flash_attn
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
from dsv4cli.plan.speed import estimate_speed
from dsv4cli.plan.tuning import apply_tuned
from dsv4cli.plan.verdict import disk_hints, verdict
from dsv4cli.system import hardware, llama_lib
from dsv4cli.units import GIB, gib
from quant.archs import ARCHS


def make_plan(source: ModelSource | ModelRef | str, inputs: PlanInputs) -> Plan:
    """Place every tensor and estimate speed; raises PlanError when the model cannot run within the budgets."""
    src = source if isinstance(source, ModelSource) else load_source(source, inputs)
    dims, n_layer = src.dims, src.dims.n_layer
    ctx_source = "flag" if inputs.ctx is not None else "default"
    reserve_source = "flag" if inputs.reserve_gib is not None else "default: max(2 GiB, 10 % of RAM)"
    local_gpus, vram_source = gpu_tiers(inputs)
    inputs, sources, tune_notes = apply_tuned(src, inputs, local_gpus)
    if inputs.ctx is None:
        inputs = dataclasses.replace(inputs, ctx=min(DEFAULT_CTX, dims.context_length))
    check_inputs(inputs, dims)
    recipe = src.recipe or {"experts": inputs.experts, "dense": inputs.dense}
    machine = resolve_machine(inputs, (recipe["experts"], recipe["dense"]), threads_source=sources["threads"])
    groups = group_layers(src.tensors, n_layer)
    kv = kv_cache(dims, n_ctx=inputs.ctx, n_ubatch=inputs.ubatch, kv_type=inputs.kv_type)
    warnings = [w] if (w := ARCHS[dims.arch].plan_warning) else []

    # 1. Devices, RPC workers first as llama.cpp orders them: whole layers (weights + KV; with workers, experts
    #    too) from the top down, then whole expert layers while they fit (at most `gpu_expert_layers`).
    devices = [*rpc_tiers(inputs), *local_gpus]
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
    gpu_experts = fill_gpus(devices, layer_tier, groups, kv, computes, n_layer, limit=inputs.gpu_expert_layers)

    # 2. Host RAM: what must be resident (embedding, host layers, their KV, the compute buffer) or it fails.
    total_ram = int(inputs.ram_gib * GIB) if inputs.ram_gib is not None else hardware.total_ram()
    reserve = reserve_bytes(inputs, total_ram)
    ram_budget = total_ram - reserve
    if inputs.ram_gib is None:
        ram_budget = min(ram_budget, hardware.available_ram())
    ram = Tier("ram", "ram", "host RAM", ram_budget, machine.ram_gbs.value)
    disk = Tier("disk", "disk", "mmap from disk", None, machine.disk_gbs.value)
    host_layers = [i for i in range(n_layer) if i not in layer_tier]
    ram.kv = sum(kv.per_layer[i] for i in host_layers)
    ram.compute = _host_compute(src, inputs, gpu=any(d.kind == "gpu" for d in used_devices))
    ram.weights = groups.host_fixed + sum(groups.dense[i] for i in host_layers)
    ram.weights += groups.root_gpu if n_layer not in layer_tier else 0
    if ram.used > ram.budget:
        raise PlanError(
            f"does not fit: host RAM needs {gib(ram.used)} for the embedding, host layers, KV and compute buffer "
            f"but has {gib(ram.budget)} (short by {gib(ram.used - ram.budget)})",
            hint="use a shorter --ctx, a smaller dense recipe (--dense q4_k), more --vram, or more RAM",
        )

    # 3. Routed experts left on the host, then Engram tables, into RAM; the rest is memory-mapped from disk.
    host_experts = [
        (s.name, s.nbytes)
        for s in src.tensors
        if tensor_class(s.name, src.dims.n_layer) == "routed_experts" and layer_of(s.name) not in gpu_experts
    ]
    placement = fill_host(ram, disk, [*host_experts, *groups.engram])
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
        reserve=reserve,
        machine=machine,
        tune_notes=tune_notes,
    )
    if disk.weights:
        plan.hints = disk_hints(plan, inputs.reserve_gib)
        if inputs.no_disk:
            raise PlanError(
                f"does not fit without disk: host RAM is short by {gib(disk.weights)} "
                f"({gib(ram.budget)} budget after a {gib(reserve)} reserve, {gib(ram.used + disk.weights)} needed)",
                hint="; ".join([*plan.hints, "or allow memory-mapping from disk (drop --no-disk)"]),
            )
    plan.estimates = estimate_speed(plan, machine)
    plan.verdict = verdict(plan)
    used_gpus = [d for d in used_devices if d.kind == "gpu"]
    gpu_bw = [(t.name, t.bandwidth_gbs, "flag" if inputs.vram_bw else "assumed") for t in used_gpus]
    params = plan.load_params()
    fa_source = sources["flash_attn"] if params.flash_attn == inputs.flash_attn else "needed by the quantized cache"
    context = {
        "ctx": Figure(inputs.ctx, "tokens", ctx_source),
        "kv_type": Figure(inputs.kv_type, "", sources["kv_type"]),
        "flash_attn": Figure(params.flash_attn, "", fa_source),
        "ubatch": Figure(params.n_ubatch, "tokens", sources["ubatch"]),
        "repack": Figure(params.repack(), "", sources["repack"]),
        "mmap": Figure(params.use_mmap, "", sources["mmap"] if not params.use_mmap or inputs.mmap else "needed"),
        "ram_reserve": Figure(round(reserve / GIB, 1), "GiB", reserve_source),
    }
    if used_devices:
        context["gpu_expert_layers"] = Figure(n_layer - len(plan.cpu_expert_layers), "", sources["gpu_expert_layers"])
    plan.assumptions = assumptions(machine, gpus=gpu_bw, context=context)
    return plan


def reserve_bytes(inputs: PlanInputs, total_ram: int) -> int:
    """Host RAM kept for the OS and everything else: --reserve, else max(2 GiB, 10 % of RAM), at most half of it.

    2 GiB covers a headless server's kernel, page tables of a large mmap and the Python process; 10 % scales it
    for desktops, whose browser and compositor grow with the machine; half keeps small test budgets usable.
    """
    if inputs.reserve_gib is not None:
        if inputs.reserve_gib * GIB >= total_ram:
            raise UsageError(
                f"--reserve {inputs.reserve_gib:g} GiB leaves nothing of {gib(total_ram)} RAM",
                hint="pass a smaller --reserve or a larger --ram",
            )
        return int(inputs.reserve_gib * GIB)
    return min(max(2 * GIB, total_ram // 10), total_ram // 2)


def _host_compute(src: ModelSource, inputs: PlanInputs, *, gpu: bool) -> int:
    """CPU-only: the calibrated buffer. Beside a GPU, llama.cpp's host buffer holds the residual stream and logits
    for the host-side ops (an uncalibrated estimate: no GPU on the calibration machine).
    """
    dims = src.dims
    if not gpu:
        return compute_buffer_bytes(dims, n_ctx=inputs.ctx, n_ubatch=inputs.ubatch, flash_attn=flash_attn(inputs))
    return inputs.ubatch * dims.hc * dims.hidden * 4 * 2 + inputs.ubatch * dims.vocab * 4
