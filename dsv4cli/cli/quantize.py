"""`dsv4 quantize`: official checkpoint -> deepseek4 GGUF with 4-bit experts (progress, summary, worst experts)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsv4cli.cli.options import (
    CtxOpt,
    DenseOpt,
    ExpertsOpt,
    JsonOpt,
    ModelArg,
    PlanFileOpt,
    RamOpt,
    VramOpt,
    check_threads,
)
from dsv4cli.ui import byte_progress, err, out, print_json
from dsv4cli.units import human_bytes
from quant.recipes import DEFAULT_DENSE, DEFAULT_EXPERTS

EXAMPLES = """\b
Examples:
  dsv4 quantize tiny                                  # default recipe: MXFP4 experts, Q8_0 dense
  dsv4 quantize deepseek-v4-flash --split-max-size 50G
  dsv4 quantize ./DeepSeek-V4-Flash-Base --experts q4_k -o flash-base.gguf
  dsv4 quantize deepseek-v4-flash --size 90G --dry-run   # the least-loss mix of types in 90 GB
  dsv4 quantize deepseek-v4-flash --fit --vram 24 --ram 64   # the largest mix `dsv4 plan` says fits there
"""


def quantize(
    model: ModelArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Output .gguf (default: $DSV4_HOME/gguf/NAME-EXPERTS-DENSE.gguf, NAME-fit-SIZE.gguf for a fitted "
            "mix; next to a folder given as MODEL).",
        ),
    ] = None,
    experts: ExpertsOpt = DEFAULT_EXPERTS,
    dense: DenseOpt = DEFAULT_DENSE,
    split_max_size: Annotated[
        str | None, typer.Option("--split-max-size", help="Write shards of at most this size, e.g. 50G.")
    ] = None,
    mtp: Annotated[bool, typer.Option("--mtp", help="Include the MTP block (speculative decoding).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    size: Annotated[
        str | None,
        typer.Option("--size", help="Fit a mix of types to this size (90G, 85.5GiB, bytes) with the least loss."),
    ] = None,
    imatrix: Annotated[
        str | None, typer.Option("--imatrix", help="Importance matrix file from `dsv4 imatrix` (needed by iq*).")
    ] = None,
    fit: Annotated[
        bool,
        typer.Option("--fit", help="Fit the largest mix that `dsv4 plan` says fits this machine (or --vram/--ram)."),
    ] = False,
    vram: VramOpt = None,
    ram: RamOpt = None,
    ctx: CtxOpt = None,
    plan: PlanFileOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --size or --fit: print the allocation, write nothing.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            callback=check_threads,
            help="Pieces converted at once (default: the converter's small pool). A fitted mix is CPU-bound: more "
            "threads go faster, each holding up to ~120 MiB more at V4-Flash's widths.",
        ),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Convert an official DeepSeek V4 checkpoint into a deepseek4 GGUF in one streaming pass."""
    from dataclasses import replace

    from dsv4cli.errors import UsageError
    from dsv4cli.models.imatrix import resolve_imatrix
    from dsv4cli.models.quantize import parse_size
    from dsv4cli.models.quantize import quantize as run_quantize
    from dsv4cli.models.ref import resolve_model
    from quant.convert import QuantOptions

    options = QuantOptions(
        experts=experts,
        dense=dense,
        mtp=mtp,
        split_max_size=parse_size(split_max_size, flag="--split-max-size") if split_max_size else 0,
        imatrix=str(resolve_imatrix(imatrix)) if imatrix else "",
    )
    if threads:
        options = replace(options, workers=threads)
    machine = vram is not None or ram is not None or ctx is not None or plan is not None
    if fit and size is not None:
        raise UsageError("--fit chooses the size itself; drop --size or --fit")
    if machine and not fit:
        raise UsageError("--vram/--ram/--ctx/--plan describe the machine for --fit", hint="add --fit")
    if size is not None or fit:
        inputs = _machine(plan, vram, ram, ctx) if fit else None
        budget = parse_size(size, flag="--size") if size is not None else None
        options = _fitted(model, budget, inputs, options, dry_run=dry_run, json_output=json_output)
        if options is None:
            return
    elif dry_run:
        raise UsageError("--dry-run: it prints a --size or --fit allocation", hint="add --size, e.g. --size 90G")
    display = byte_progress(transient=True)
    task = display.add_task("quantize", total=None)
    with display:  # Ctrl-C keeps the finished tensors: the same command resumes after them
        report = run_quantize(
            resolve_model(model),
            output=output,
            options=options,
            force=force,
            progress=lambda done, total: display.update(task, completed=done, total=total),
        )
    worst = report.worst(5)
    if json_output:
        data = report.to_dict()
        data.pop("expert_errors")
        data["worst_experts"] = [vars(e) for e in worst]
        print_json(data)
        return
    rate = report.source_bytes / max(report.seconds, 1e-9)
    out.print(f"wrote {', '.join(report.outputs)}")
    if report.resumed_tensors:
        out.print(f"  resumed after {report.resumed_tensors} tensors written by an interrupted run")
    out.print(
        f"  {report.tensors} tensors, {human_bytes(report.bytes_written)} from {human_bytes(report.source_bytes)} "
        f"in {report.seconds:.1f} s ({human_bytes(rate)}/s); experts {report.experts}, dense {report.dense}"
    )
    out.print(f"  experts: {report.expert_method}; report {report.report_file}")
    for fallback in report.fallbacks[:5]:
        err.print(f"note: {fallback['tensor']} stored as {fallback['used']} (rows do not fit {fallback['wanted']})")
    if len(report.fallbacks) > 5:
        err.print(f"note: {len(report.fallbacks) - 5} more tensors fell back; see the report")
    if worst and worst[0].rms > 0:
        out.print("  worst experts (RMS error vs source; plain quantizer in brackets):")
        for e in worst:
            out.print(
                f"    blk.{e.layer}.{e.proj}[{e.expert}]  rms {e.rms:.3g} [{e.plain_rms:.3g}]  max {e.max_abs:.3g}"
            )


def _machine(plan: Path | None, vram: str | None, ram: float | None, ctx: int | None):
    """The plan inputs --fit fits to: a plan file's machine, else the flags (unset ones: this machine's)."""
    from dsv4cli.cli.options import placement
    from dsv4cli.plan.schema import plan_budgets

    where = placement(plan, vram, ram, ctx, cpu=False)
    return plan_budgets(plan) if plan is not None else where.plan_inputs()


def _fitted(model: str, budget: int | None, inputs, options, *, dry_run: bool, json_output: bool):
    """Measure and allocate for `--size` (or, with plan `inputs`, `--fit`); prints the allocation; None after a dry
    run."""
    from dsv4cli.models.fit import cached_imatrix, fit_measured, measure_fit
    from dsv4cli.models.fit_machine import fit_machine
    from dsv4cli.models.quantize import resolve_source
    from dsv4cli.models.ref import resolve_model

    ref = resolve_model(model)
    folder, _ = resolve_source(ref, options)
    matrix = Path(options.imatrix) if options.imatrix else cached_imatrix(model)
    with err.status("measuring each tensor group's loss in every candidate type") as status:
        measured = measure_fit(folder, options, matrix, progress=lambda g: status.update(f"measuring {g}"))
    if budget is None:
        with err.status("planning candidate sizes for this machine"):
            chosen = fit_machine(measured, options, inputs, folder.name)
        result, budget = chosen.fit, chosen.fit.budget
        if not json_output:
            err.print(f"fit: {human_bytes(budget)} ({budget} bytes) is the largest size that fits: "
                      f"{chosen.plan.verdict}", markup=False)  # fmt: skip
    else:
        result = fit_measured(measured, budget, options)
    a = result.allocation
    if json_output and dry_run:
        print_json({"budget": budget, "bytes": a.nbytes, "lossless": result.lossless, "loss": a.loss,
                    "imatrix": str(matrix) if matrix else None, "mix": a.mix})  # fmt: skip
        return None
    where = f"importance matrix {matrix.name}" if matrix else "the weights alone (no imatrix: run `dsv4 imatrix`)"
    err.print(
        f"fit: {human_bytes(a.nbytes)} ({a.nbytes} bytes) for a budget of {human_bytes(budget)} "
        f"({100 * a.nbytes / budget:.2f} %); lossless is {human_bytes(result.lossless)}; loss measured with {where}"
    )
    by_recipe: dict[str, list[str]] = {}
    for group, recipe in sorted(a.mix.items()):
        by_recipe.setdefault(recipe, []).append(group)
    for recipe, groups in sorted(by_recipe.items()):
        err.print(f"  {recipe:8} {', '.join(groups)}")
    return None if dry_run else result.options


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(quantize)
