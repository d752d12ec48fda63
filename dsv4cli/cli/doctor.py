"""`dsv4 doctor`: print what this machine and install can do, and each problem with the command that fixes it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from dsv4cli.cli.options import JsonOpt
from dsv4cli.ui import err, out, print_json
from dsv4cli.units import human_bytes

if TYPE_CHECKING:
    from dsv4cli.system.doctor import Report


def doctor(
    remeasure: Annotated[
        bool, typer.Option("--remeasure", help="Measure RAM and disk bandwidth again (else the cached figures).")
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Check the llama.cpp build, GPUs, CPU, RAM, disk and bandwidths; list problems with their fixes."""
    from dsv4cli.system.doctor import diagnose

    with err.status("checking this machine (measuring bandwidth takes a few seconds the first time)"):
        report = diagnose(remeasure=remeasure)
    if json_output:
        print_json(report.to_dict())
    else:
        _render(report)


def _render(report: Report) -> None:
    llama = report.llama
    if llama:
        ggml = f"ggml {llama['ggml_version']} (commit {llama['ggml_commit']})"
        out.print(f"llama.cpp       llama-cpp-python {llama['version']}, {ggml}")
        out.print(f"  backends      {', '.join(llama['backends'])}")
        out.print(f"  GPU offload   {'yes' if llama['gpu_offload'] else 'no'}; RPC {'yes' if llama['rpc'] else 'no'}")
        out.print(f"  CPU features  {' '.join(llama['cpu_features'])}")
        repack = ", ".join(llama["extra_buffer_types"]) or "none"
        why = ""
        if "AMX" in repack and not llama["repack"]:
            why = "; off: AMX cannot run deepseek4's attn_wo_a product, DSV4_REPACK=on forces it"
        out.print(f"  repacking     {'on' if llama['repack'] else 'off'} (extra buffer types: {repack}{why})")
    engine = report.engine
    if "error" in engine:
        out.print(f"llama-server    {engine['error']}", markup=False)
    else:
        out.print(
            f"llama-server    {engine['version']} ({engine['gpu'] or 'DSV4_ENGINE_BIN'}), {engine['server']}",
            markup=False,
        )
    gpus = ", ".join(f"{g['name']} ({human_bytes(g['free_bytes'])} free)" for g in report.gpus)
    out.print(f"GPUs            {gpus or 'none found'} (via {report.gpu_source})")
    cpu = report.cpu
    out.print(f"CPU             {cpu['machine']}, {cpu['physical_cores']} cores ({cpu['logical_cores']} threads)")
    total, available = human_bytes(report.ram["total_bytes"]), human_bytes(report.ram["available_bytes"])
    out.print(f"RAM             {total} total, {available} available")
    out.print(f"disk            {human_bytes(report.disk['free_bytes'])} free under {report.disk['home']}")
    if report.bandwidth:
        bw = report.bandwidth
        when = "cached" if bw["cached"] else "measured now"
        out.print(f"bandwidth       RAM {bw['ram_gbs']:.1f} GB/s, disk {bw['disk_gbs']:.1f} GB/s ({when})")
    for cal in report.calibration:
        out.print(
            f"CPU kernels     {cal['experts']}/{cal['dense']}, {cal['threads']} thread(s): dense GEMV "
            f"{cal['dense_gbs']:.1f} GB/s, expert GEMV {cal['expert_gbs']:.1f} GB/s, "
            f"{cal['layer_s'] * 1e3:.2f} ms/layer"
        )
    if not report.calibration:
        out.print("CPU kernels     not measured yet (dsv4 plan MODEL --calibrate)")
    if not report.problems:
        out.print("no problems found")
    for problem in report.problems:
        out.print(f"problem: {problem.message}\n  fix: {problem.fix}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
