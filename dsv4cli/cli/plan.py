"""`dsv4 plan`: where each tensor of a model goes (GPU / host RAM / disk) and how fast it will run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dsv4cli.cli.options import (
    MAX_GIB,
    CtxOpt,
    DenseOpt,
    ExpertsOpt,
    JsonOpt,
    KvTypeOpt,
    MarginOpt,
    ModelArg,
    RamOpt,
    RpcOpt,
    ThreadsOpt,
    UbatchOpt,
    UntunedOpt,
    VramOpt,
    bandwidth_opt,
    gib_list,
    in_range,
)
from dsv4cli.gguf_io.read import recipe_label
from dsv4cli.ui import err, out, print_json
from dsv4cli.units import human_bytes
from quant.errors import printable
from quant.recipes import DEFAULT_DENSE, DEFAULT_EXPERTS

if TYPE_CHECKING:
    from dsv4cli.plan import Plan


def plan(
    model: ModelArg,
    vram: VramOpt = None,
    ram: RamOpt = None,
    no_disk: Annotated[bool, typer.Option("--no-disk", help="Forbid weights memory-mapped from disk.")] = False,
    ctx: CtxOpt = None,
    ubatch: UbatchOpt = None,
    kv_type: KvTypeOpt = None,
    flash_attn: Annotated[
        bool | None, typer.Option("--flash-attn/--no-flash-attn", help="Flash attention (default: tuned, else on).")
    ] = None,
    untuned: UntunedOpt = False,
    margin: MarginOpt = 1.0,
    experts: ExpertsOpt = DEFAULT_EXPERTS,
    dense: DenseOpt = DEFAULT_DENSE,
    ram_bw: Annotated[float | None, bandwidth_opt("--ram-bw", "Host RAM read")] = None,
    vram_bw: Annotated[float | None, bandwidth_opt("--vram-bw", "GPU memory")] = None,
    disk_bw: Annotated[float | None, bandwidth_opt("--disk-bw", "Disk read")] = None,
    pcie_bw: Annotated[float | None, bandwidth_opt("--pcie-bw", "Host-to-GPU")] = None,
    threads: ThreadsOpt = None,
    rpc: RpcOpt = None,
    rpc_bw: Annotated[float | None, bandwidth_opt("--rpc-bw", "RPC workers' memory (default: the RAM figure)")] = None,
    measure: Annotated[bool, typer.Option("--measure", help="Measure RAM and disk bandwidth here again.")] = False,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate",
            help="Measure this machine again: bandwidths and llama.cpp's kernels for this recipe (cached).",
        ),
    ] = False,
    cpu_gbs: Annotated[
        float | None,
        bandwidth_opt("--cpu-gbs", "GEMV per CPU thread (planning for another machine; skips calibration)"),
    ] = None,
    reserve: Annotated[
        float | None,
        typer.Option(
            "--reserve",
            callback=in_range("--reserve", 0, MAX_GIB),
            help="GiB of host RAM kept for the OS (default: max(2, 10 % of RAM)).",
        ),
    ] = None,
    llama_args: Annotated[bool, typer.Option("--llama-args", help="Print the equivalent llama-server flags.")] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the plan JSON (for chat --plan).")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Plan GPU / RAM / disk placement for a GGUF, a checkpoint folder or a registry name, with predicted speed."""
    from dsv4cli.models.ref import resolve_model
    from dsv4cli.plan import PlanInputs, make_plan, save_plan
    from dsv4cli.rpc.protocol import parse_endpoints

    inputs = PlanInputs(
        vram_gib=gib_list(vram),
        ram_gib=ram,
        no_disk=no_disk,
        ctx=ctx,
        ubatch=ubatch,
        kv_type=kv_type,
        margin_gib=margin,
        experts=experts,
        dense=dense,
        ram_bw=ram_bw,
        vram_bw=vram_bw,
        disk_bw=disk_bw,
        pcie_bw=pcie_bw,
        measure=measure,
        threads=threads,
        calibrate=calibrate,
        cpu_gbs=cpu_gbs,
        reserve_gib=reserve,
        flash_attn=flash_attn,
        untuned=untuned,
        rpc_bw=rpc_bw,
        rpc=parse_endpoints(rpc) if rpc else (),
    )
    result = make_plan(resolve_model(model), inputs)
    if output is not None:
        save_plan(result, output)
    if json_output:
        print_json(result.to_dict())
        return
    if llama_args:
        out.print(printable(" ".join(_quote(a) for a in ["llama-server", *result.llama_args()])), markup=False)
        return
    _render(result)
    if output is not None:
        err.print(f"plan written to {output}")


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in "|()\\ ^") else arg


def _render(result: Plan) -> None:
    src = result.source
    what = f"{src.name} ({src.kind}" + (f", {recipe_label(src.recipe)})" if src.recipe else ")")
    what = escape(printable(what))  # names, hosts and messages below may come from strangers (a file, --rpc)
    gpus = [t for t in result.tiers if t.kind == "gpu"]
    if result.vram_source == "none":
        err.print("no GPU found (NVML, nvidia-smi, rocm-smi): CPU-only plan; pass --vram GiB to plan for a GPU")
    elif result.vram_source != "flag":
        found = ", ".join(f"{t.device} ({human_bytes(t.budget or 0)} free)" for t in gpus)
        err.print(printable(f"VRAM detected via {result.vram_source}: {found}"), markup=False)
    table = Table(title=what, box=box.SIMPLE_HEAD)
    for column, justify in (("tier", "left"), ("class", "left"), ("tensors", "right"), ("bytes", "right")):
        table.add_column(column, justify=justify)
    for row in result.class_rows():
        table.add_row(Text(printable(row["tier"])), row["class"], str(row["count"]), human_bytes(row["bytes"]))
    for tier in result.tiers:
        if tier.kv or tier.compute or tier.margin:
            parts = f"KV {human_bytes(tier.kv)}, compute {human_bytes(tier.compute)}, margin {human_bytes(tier.margin)}"
            table.add_row(Text(printable(tier.name)), "context", "", parts)
    out.print(table)
    budget = Table(box=box.SIMPLE_HEAD)
    rpc = any(t.kind == "rpc" for t in result.tiers)
    for column in ("tier", "device", "used", "budget", "GB/s", *(("network",) if rpc else ())):
        budget.add_column(column)
    for tier in result.tiers:
        limit = human_bytes(tier.budget) if tier.budget is not None else "-"
        names = [Text(printable(tier.name)), Text(printable(tier.device))]
        row: list[Text | str] = [*names, human_bytes(tier.used), limit, f"{tier.bandwidth_gbs:.1f}"]
        if rpc:
            row.append(f"{tier.rtt_s * 1e3:.2f} ms, {tier.net_gbs:.2f} GB/s" if tier.kind == "rpc" else "")
        budget.add_row(*row)
    out.print(budget)
    figures = Table(title="assumptions", box=box.SIMPLE_HEAD)
    for column in ("figure", "value", "source"):
        figures.add_column(column)
    for name, figure in result.assumptions.items():
        value = figure["value"]
        text = ("on" if value else "off") if isinstance(value, bool) else f"{value} {figure['unit']}".strip()
        figures.add_row(name.replace("_", " "), text, figure["source"])
    out.print(figures)
    for warning in result.warnings:
        err.print(printable(f"warning: {warning}"), markup=False)
    for note in [*(result.machine.notes if result.machine else ()), *result.tune_notes]:
        err.print(printable(f"note: {note}"), markup=False)
    out.print(printable(result.verdict), markup=False)
    for hint in result.hints:
        out.print(printable(f"  to fit: {hint}"), markup=False)
    if src.fetched_bytes is not None:
        err.print(
            f"planned from the GGUF headers on the Hub: read {human_bytes(src.fetched_bytes)} of a "
            f"{human_bytes(src.download_bytes or 0)} download ({src.fetched_bytes} bytes)"
        )


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
