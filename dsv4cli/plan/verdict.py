"""The plan's verdict and what would make a plan that does not fit in memory fit.

"fits" means every weight is in RAM or VRAM. A plan that memory-maps weights from disk says so first, with its
speed, and names only things that exist: the RAM it would need, a recipe whose real byte total (every tensor's
size recomputed in that recipe's types) is smaller and that quantizes without an importance matrix, the fitted
quant (`dsv4 quantize --fit` with the same budgets: the least-loss mix of types that fits), more VRAM, or an RPC
worker on a second machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dsv4cli.plan.groups import tensor_class
from dsv4cli.plan.inputs import DEFAULT_CTX
from dsv4cli.plan.model import Plan
from dsv4cli.units import GIB, gib, human_bytes
from quant.fit_groups import fit_group
from quant.importance import candidates
from quant.mapping import fit_type, nbytes_of
from quant.recipes import DENSE_RECIPES, EXPERT_RECIPES, RECIPES


def recipe_bytes(tensors: Sequence[Any], recipe: dict[str, str], n_layer: int) -> dict[tuple[str, str], int]:
    """Total tensor bytes of the same model in every recipe: experts and dense projections retyped."""
    old_experts, old_dense = int(EXPERT_RECIPES[recipe["experts"]]), int(DENSE_RECIPES[recipe["dense"]])
    totals = {}
    for e_name, e_type in EXPERT_RECIPES.items():
        for d_name, d_type in DENSE_RECIPES.items():
            total = 0
            for spec in tensors:
                routed = tensor_class(spec.name, n_layer) == "routed_experts"
                if routed and spec.ggml_type == old_experts:
                    total += nbytes_of(spec.ne, fit_type(e_type, spec.ne[0]))
                elif not routed and spec.ggml_type == old_dense:
                    total += nbytes_of(spec.ne, fit_type(d_type, spec.ne[0]))
                else:
                    total += spec.nbytes
            totals[(e_name, d_name)] = total
    return totals


def disk_hints(plan: Plan, reserve_gib: float | None) -> list[str]:
    """What would keep every weight in memory: more RAM, a smaller recipe that exists, more VRAM."""
    spill = plan.tier("disk").weights
    need = plan.tier("ram").used + spill
    # RAM whose budget after the reserve (given, or the default max(2 GiB, 10 %)) holds `need`
    total = need + reserve_gib * GIB if reserve_gib is not None else max(need + 2 * GIB, need / 0.9)
    hints = [f"{gib(total)} of RAM would hold every weight (--ram {math.ceil(total / GIB)}, reserve included)"]
    recipe = plan.source.recipe or {"experts": plan.inputs.experts, "dense": plan.inputs.dense}
    if not recipe.get("fit") and recipe.get("experts") in EXPERT_RECIPES and recipe.get("dense") in DENSE_RECIPES:
        sizes = recipe_bytes(plan.source.tensors, recipe, plan.source.dims.n_layer)
        now = sizes[(recipe["experts"], recipe["dense"])]
        plain = [(size, r) for r, size in sizes.items() if not any(RECIPES[name].needs_imatrix for name in r)]
        smaller = sorted((size, r) for size, r in plain if size < now)
        if smaller:
            size, (experts, dense) = smaller[0]
            fits = "fits in RAM" if now - size >= spill else f"still streams {gib(spill - (now - size))}"
            hints.append(f"--experts {experts} --dense {dense} is {gib(now - size)} smaller ({fits})")
        if now - smallest_mix_bytes(plan.source.tensors) >= spill:
            hints.append(f"{fit_command(plan)} writes the largest mix of types that fits, with the least measured loss")
    hints.append("more VRAM takes experts off the host (--vram GiB per GPU, e.g. --vram 24,24)")
    hints.append("a second machine's memory: run `dsv4 worker` there and plan with --rpc HOST:PORT")
    return hints


def smallest_mix_bytes(tensors: Sequence[Any]) -> int:
    """Total tensor bytes of the smallest mix `dsv4 quantize --fit` can choose (with an importance matrix)."""
    total = 0
    for spec in tensors:
        group = fit_group(spec.name)
        types = [RECIPES[name].ggml_type for name in candidates(group, imatrix=True)] if group else []
        total += min((nbytes_of(spec.ne, fit_type(t, spec.ne[0])) for t in types), default=spec.nbytes)
    return total


def fit_command(plan: Plan) -> str:
    """`dsv4 quantize MODEL --fit` with the budgets this plan was made with (MODEL: the checkpoint when known)."""
    src, inputs = plan.source, plan.inputs
    model = src.checkpoint or (src.name if src.target is not None else "MODEL")
    flags = [f"--vram {','.join(f'{v:g}' for v in inputs.vram_gib)}"] if inputs.vram_gib else []
    flags += [f"--ram {inputs.ram_gib:g}"] if inputs.ram_gib is not None else []
    flags += [f"--ctx {inputs.ctx}"] if inputs.ctx != min(DEFAULT_CTX, src.dims.context_length) else []
    return " ".join(["`dsv4 quantize", model, "--fit", *flags]) + "`"


def verdict(plan: Plan) -> str:
    est = plan.estimates
    counts = list(zip(plan.tiers, plan.gpu_layer_counts, strict=False))
    n_gpus = sum(1 for t, n in counts if n and t.kind == "gpu")
    n_rpc = len({t.endpoint for t, n in counts if n and t.kind == "rpc"})
    devices = " + ".join(
        part for part in (f"{n_rpc} RPC worker(s)" if n_rpc else "", f"{n_gpus} GPU(s)" if n_gpus else "") if part
    )
    where = f"{plan.n_gpu_layers}/{plan.source.dims.n_layer + 1} layers on {devices}" if devices else "CPU only"
    network = est["decode_seconds_per_token"].get("network")
    if network is not None:
        sent = human_bytes(est["decode_bytes_per_token"]["network"])
        where += f" (network: {sent} and {network * 1e3:.2f} ms per token)"
    speed = (
        f"~{est['decode_tok_s']:.1f} tok/s decode (~{est['decode_tok_s_full_ctx']:.1f} at a full {plan.kv.n_ctx}"
        f"-token context; bound by {est['decode_bottleneck']}), ~{est['prefill_tok_s']:.0f} tok/s prefill"
    )
    disk = plan.tier("disk").weights
    ram = gib(plan.tier("ram").used)
    if disk:
        return f"streams from disk: {gib(disk)} of weights memory-mapped, {where}, {ram} host RAM; {speed}"
    return f"fits: {where}, {ram} host RAM; {speed}"
