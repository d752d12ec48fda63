"""Placement: which tier (RPC worker, GPU, host RAM, disk) holds each tensor, layer by layer as llama.cpp offloads them.

See `dsv4cli.plan` for the rules; these are the steps `make_plan` runs in order.
"""

from __future__ import annotations

from dsv4cli.engine.kvcache import KV_TYPES, KvCache, ModelDims
from dsv4cli.errors import UsageError
from dsv4cli.plan.groups import Layers, layer_of, tensor_class
from dsv4cli.plan.inputs import PlanInputs
from dsv4cli.plan.model import Tier
from dsv4cli.plan.source import ModelSource
from dsv4cli.rpc.protocol import probe
from dsv4cli.system import hardware
from dsv4cli.units import GIB


def check_inputs(inputs: PlanInputs, dims: ModelDims) -> None:
    if inputs.vram_gib is not None and any(v <= 0 for v in inputs.vram_gib):
        raise UsageError("--vram: every GPU budget must be positive GiB", hint="e.g. --vram 24 or --vram 24,24")
    for flag, value in (("--ram", inputs.ram_gib), ("--ram-bw", inputs.ram_bw), ("--vram-bw", inputs.vram_bw),
                        ("--disk-bw", inputs.disk_bw), ("--pcie-bw", inputs.pcie_bw),
                        ("--cpu-gbs", inputs.cpu_gbs)):  # fmt: skip
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value:g}")
    if inputs.reserve_gib is not None and inputs.reserve_gib < 0:
        raise UsageError(f"--reserve must be zero or positive, got {inputs.reserve_gib:g}")
    if inputs.margin_gib < 0:
        raise UsageError(f"--margin must be zero or positive, got {inputs.margin_gib:g}")
    if inputs.ctx <= 0:
        raise UsageError(f"--ctx must be positive, got {inputs.ctx}")
    if inputs.ctx > dims.context_length:
        raise UsageError(f"--ctx {inputs.ctx} is beyond the model's context length {dims.context_length}")
    if inputs.threads is not None and inputs.threads < 1:
        raise UsageError(f"--threads must be positive, got {inputs.threads}")
    if inputs.ubatch < 1:
        raise UsageError(f"--ubatch must be positive, got {inputs.ubatch}")
    if inputs.kv_type not in KV_TYPES:
        raise UsageError(f"--kv-type {inputs.kv_type!r}: choose one of {', '.join(KV_TYPES)}")


def gpu_tiers(inputs: PlanInputs) -> tuple[list[Tier], str]:
    margin = int(inputs.margin_gib * GIB)
    if inputs.vram_gib is not None:
        names = [f"GPU {i}" for i in range(len(inputs.vram_gib))]
        budgets = [int(v * GIB) for v in inputs.vram_gib]
        source = "flag"
        bws = [inputs.vram_bw or hardware.DEFAULT_GPU_BW] * len(budgets)
    else:
        scan = hardware.detect_gpus()
        names = [g.name for g in scan.gpus]
        budgets = [g.free_bytes for g in scan.gpus]
        source = scan.source
        bws = [inputs.vram_bw or hardware.gpu_bandwidth(g.name) for g in scan.gpus]
    tiers = [
        Tier(f"gpu{i}", "gpu", name, budget, bw, margin=margin)
        for i, (name, budget, bw) in enumerate(zip(names, budgets, bws, strict=True))
    ]
    return tiers, source


def rpc_tiers(inputs: PlanInputs) -> list[Tier]:
    """One tier per device of each RPC worker, in `--rpc` order, with the memory it reports (within its
    `dsv4 worker --mem` budget) and the round trip and transfer rate measured to it now."""
    tiers = []
    for endpoint in inputs.rpc:
        info = probe(endpoint)
        net = info.bandwidth_gbs or hardware.DEFAULT_NET_BW
        for d, device in enumerate(info.devices):
            name = f"{endpoint}" + (f" dev {d}" if len(info.devices) > 1 else "")
            tiers.append(
                Tier(
                    f"rpc{len(tiers)}",
                    "rpc",
                    name,
                    device.free,
                    inputs.rpc_bw or hardware.DEFAULT_RAM_BW,
                    margin=int(inputs.margin_gib * GIB),
                    endpoint=str(endpoint),
                    rtt_s=info.rtt_s,
                    net_gbs=net,
                )
            )
    return tiers


def fit_gpu_layers(
    gpus: list[Tier], groups: Layers, kv: KvCache, compute: list[int], n_layer: int
) -> tuple[int, list[list[int]]] | None:
    """Largest -ngl whose layers fit, with per-device layer lists (lower layers on earlier devices).

    As in llama.cpp, index n_layer is the output head and -ngl N offloads indices n_layer + 1 - N .. n_layer:
    the head first, then layers from the top down. With several GPUs the layers are split in contiguous blocks
    in proportion to each GPU's room, so every GPU also keeps room for its own layers' experts; where that does
    not fit, lower GPUs are filled first. With RPC workers (first in llama.cpp's device order) layers are placed
    whole, experts included: a layer's experts left on the client would cross the network twice per layer.
    """
    room = [g.free - c for g, c in zip(gpus, compute, strict=True)]
    whole = any(g.kind == "rpc" for g in gpus)
    for ngl in range(n_layer + 1, 0, -1):
        layers = list(range(n_layer + 1 - ngl, n_layer + 1))
        need = [
            groups.root_gpu if i == n_layer else groups.dense[i] + kv.per_layer[i] + (groups.experts[i] if whole else 0)
            for i in layers
        ]
        for proportional in (True, False):
            assigned = _assign_layers(layers, need, room, proportional=proportional)
            if assigned is not None:
                return ngl, assigned
    return None


def _assign_layers(
    layers: list[int], need: list[int], room: list[int], *, proportional: bool
) -> list[list[int]] | None:
    """Layers in order onto GPUs in order; None when they do not fit. `proportional` ends each GPU's block at
    its share of the total room (by the layer's midpoint), else only when the GPU is full."""
    capacity = sum(max(r, 0) for r in room)
    total = sum(need)
    ends, acc = [], 0
    for r in room:
        acc += max(r, 0)
        ends.append(total * acc / capacity if proportional and capacity else float("inf"))
    left = list(room)
    assigned: list[list[int]] = [[] for _ in room]
    gi, done = 0, 0
    for layer, nbytes in zip(layers, need, strict=True):
        while gi < len(room) and (nbytes > left[gi] or (gi < len(room) - 1 and done + nbytes / 2 > ends[gi])):
            gi += 1
        if gi == len(room):
            return None
        left[gi] -= nbytes
        done += nbytes
        assigned[gi].append(layer)
    return assigned


def fill_gpus(
    gpus: list[Tier],
    layer_tier: dict[int, str],
    groups: Layers,
    kv: KvCache,
    compute: list[int],
    n_layer: int,
    *,
    limit: int | None = None,
) -> set[int]:
    """Charge the offloaded layers to their GPUs, then add whole expert layers from the top while they fit
    (on each GPU: a full GPU does not stop the others), at most `limit` of them (a tuned count)."""
    by_name = {g.name: g for g in gpus}
    for g, c in zip(gpus, compute, strict=True):
        g.compute = c if g.name in layer_tier.values() else 0
    for layer, name in layer_tier.items():
        by_name[name].weights += groups.root_gpu if layer == n_layer else groups.dense[layer]
        by_name[name].kv += kv.per_layer[layer] if layer < n_layer else 0
    gpu_experts: set[int] = set()
    full: set[str] = set()
    for layer in sorted((layer for layer in layer_tier if layer < n_layer), reverse=True):
        tier = by_name[layer_tier[layer]]
        if tier.name in full or groups.experts[layer] > tier.free or len(gpu_experts) == limit:
            full.add(tier.name)
            continue
        tier.weights += groups.experts[layer]
        gpu_experts.add(layer)
    return gpu_experts


def fill_host(ram: Tier, disk: Tier, items: list[tuple[str, int]]) -> dict[str, str]:
    """Routed experts, then Engram tables, into what RAM has left; the rest is memory-mapped from disk."""
    placement = {}
    for name, nbytes in items:
        tier = ram if nbytes <= ram.free else disk
        tier.weights += nbytes
        placement[name] = tier.name
    return placement


def place_fixed(source: ModelSource, placement: dict[str, str], layer_tier: dict[int, str]) -> None:
    """Tensors that follow their layer: dense weights with it, the embedding on the host, the MTP block skipped."""
    n_layer = source.dims.n_layer
    for spec in source.tensors:
        if spec.name in placement:
            continue
        cls, layer = tensor_class(spec.name, n_layer), layer_of(spec.name)
        if cls == "mtp":
            placement[spec.name] = "skipped"
        elif cls == "token_embd":
            placement[spec.name] = "ram"
        elif cls == "routed_experts":
            placement[spec.name] = layer_tier[layer]
        else:
            placement[spec.name] = layer_tier.get(n_layer if layer is None else layer, "ram")
