"""Fitted quants against llama-quantize's named mixes (or dsv4's fixed recipes) at the same size, on a model at
V4-Flash's real widths whose layers differ on purpose in how much they matter.

A generated checkpoint at V4-Flash's hidden width (`bench_models.REAL_CONFIG`: rows of 4096) made small enough to
convert many times in minutes on two cores (CONFIG: 8 heads in 2 output groups, 4 experts top-2 of width 512;
~230 M weights with the MTP block, under the built-in model cap). FP4 experts, FP8 dense, random weights; the
projections each layer writes into the residual stream with (attention output, shared and routed down) are drawn
LAYER_GAINS times wider than the generator's default: layer 0 writes 16x the power of layer 1, layer 2 1/16x
(`--equal-layers`: the same model without them).
Each baseline is either llama.cpp's own `llama-quantize` (from `dsv4 engine build`) at one of its named mixes
(`lq:Q2_K`), applied to the lossless conversion with BF16 dense tensors (`--allow-requantize` for its MXFP4
experts; tried with dsv4's importance matrix first, and without when llama-quantize refuses it, as it does at
deepseek4's grouped output projection: the row says which), or a fixed dsv4 recipe EXPERTS/DENSE (with the
importance matrix). Against each: `dsv4 quantize --size B`, B the baseline's file size, with the importance
matrix of `dsv4 imatrix` on the lossless conversion. Both are measured by `dsv4 eval` against the lossless
reference (MXFP4 experts, BF16 dense) on the built-in text. Prints one row per budget: sizes, KLD mean and top-1
agreement of each.

    .venv/bin/python bench/fit.py [--models DIR] [--recipes lq:Q2_K,lq:Q3_K_M,lq:IQ4_XS,q4_0/q4_k] [--ctx 128]
                                  [--chunks 4] [--json] [--equal-layers]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench_models import REAL_CONFIG
from eval import convert, models_folder, parse_args, print_note

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NAME = "bench-fit-gains"
LAYER_GAINS = (4.0, 1.0, 0.25)  # what each layer writes into the residual stream, times the generator's default
CONFIG = {**REAL_CONFIG, "num_attention_heads": 8, "index_n_heads": 8, "o_groups": 2, "n_routed_experts": 4,
          "num_experts_per_tok": 2, "moe_intermediate_size": 512}  # fmt: skip


def main() -> None:
    args = parse_args(
        __doc__,
        "lq:Q2_K,lq:Q3_K_M,lq:IQ4_XS",
        "baselines: lq:MIX (llama-quantize's named mix) or a fixed dsv4 EXPERTS/DENSE, comma-separated",
        {"--equal-layers": "the same model with every layer at the generator's default (no LAYER_GAINS)"},
    )
    name, gains = ("bench-fit", ()) if args.equal_layers else (NAME, LAYER_GAINS)
    with models_folder(args.models) as folder:
        rows = run(folder, args.recipes.split(","), args.ctx, args.chunks, name=name, gains=gains)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    head = f"{'baseline':<14}{'MiB':>8}{'KLD mean':>11}{'top-1':>8}  |"
    print(head + f"{'fitted MiB':>11}{'KLD mean':>11}{'top-1':>8}")
    for r in rows:
        f, d = r["fixed"], r["fitted"]
        fitted = f"{d['bytes'] / 2**20:>11.1f}{d['kld_mean']:>11.5f}{d['top1']:>8.1%}" if d else f"  {r['why']}"
        print(f"{r['recipe']:<14}{f['bytes'] / 2**20:>8.1f}{f['kld_mean']:>11.5f}{f['top1']:>8.1%}  |{fitted}")


def run(
    folder: Path, recipes: list[str], ctx: int, chunks: int, *, name: str = NAME, gains: tuple[float, ...] = LAYER_GAINS
) -> list[dict]:
    """Per fixed recipe: its file and the fitted one of at most its size, each evaluated (model `name`, generated
    with layer `gains`)."""
    from dsv4cli.errors import Dsv4Error
    from dsv4cli.models.fit import fit_measured, measure_fit
    from dsv4cli.models.imatrix import make_imatrix
    from quant.convert import QuantOptions, quantize_checkpoint

    # eval's reference and the lossless quant, by the same converter
    reference = convert(folder, "mxfp4", "bf16", name=name, config=CONFIG, layer_gains=gains)
    lossless = convert(folder, "mxfp4", "q8_0", name=name, config=CONFIG, layer_gains=gains)
    matrix, _, _ = make_imatrix(str(lossless), max_chunks=chunks)
    checkpoint = folder / name
    measured = measure_fit(checkpoint, QuantOptions(), matrix)
    rows = []
    for recipe in recipes:
        if recipe.startswith("lq:"):
            fixed = llama_quantize(reference, folder / f"{name}-llama-quantize-{recipe[3:]}", recipe[3:], matrix)
        else:
            experts, dense = recipe.split("/")
            fixed = folder / f"{name}-{experts}-{dense}-imatrix.gguf"
            if not fixed.is_file():
                quantize_checkpoint(checkpoint, fixed, QuantOptions(experts=experts, dense=dense, imatrix=str(matrix)))
        budget = fixed.stat().st_size
        if budget >= measured.lossless:
            print_note(f"{recipe}: {budget} bytes is not below the lossless {measured.lossless}; skipped")
            continue
        fitted = folder / f"{name}-fit-{budget}.gguf"
        if not fitted.is_file():
            try:
                options = fit_measured(measured, budget, QuantOptions()).options
            except Dsv4Error as e:  # below dsv4's smallest mix: the row says so
                rows.append({"recipe": recipe, "fixed": evaluate(fixed, ctx, chunks), "fitted": None, "why": str(e)})
                continue
            quantize_checkpoint(checkpoint, fitted, options)
        rows.append({"recipe": recipe, "fixed": evaluate(fixed, ctx, chunks), "fitted": evaluate(fitted, ctx, chunks)})
    return rows


def llama_quantize(source: Path, stem: Path, mix: str, imatrix: Path) -> Path:
    """`source` requantized by the engine build's llama-quantize to its named mix, with `imatrix` where it accepts
    it (STEM-imatrix.gguf), else without (STEM.gguf, and a note saying why); kept once written."""
    from dsv4cli.toolchain.build import installed_engine

    engine = installed_engine()
    if engine is None or not engine.tool("llama-quantize").is_file():
        sys.exit("bench/fit.py: lq: baselines need llama-quantize: run `dsv4 engine build`")

    def run(out: Path, *flags: str) -> str | None:
        """Write `out` (None) or say why llama-quantize failed."""
        if out.is_file():
            return None
        partial = out.with_name(out.name + ".partial")
        tool = str(engine.tool("llama-quantize"))
        done = subprocess.run([tool, "--allow-requantize", *flags, str(source), str(partial), mix, "2"],
                              capture_output=True, text=True, errors="replace")  # fmt: skip
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            lines = done.stderr.strip().splitlines() or ["no output"]
            return next((line for line in reversed(lines) if "failed to quantize:" in line), lines[-1])
        partial.replace(out)
        return None

    weighted = stem.with_name(stem.name + "-imatrix.gguf")
    refused = run(weighted, "--imatrix", str(imatrix))
    if refused is None:
        return weighted
    print_note(f"lq:{mix}: without the imatrix, which llama-quantize refuses: {refused}")
    failed = run(stem.with_name(stem.name + ".gguf"))
    if failed is not None:
        sys.exit(f"bench/fit.py: llama-quantize {mix} failed: {failed}")
    return stem.with_name(stem.name + ".gguf")


def evaluate(model: Path, ctx: int, chunks: int) -> dict:
    from dsv4cli.eval.run import EvalOptions, evaluate
    from dsv4cli.load.placement import Placement
    from dsv4cli.models.ref import ModelRef

    options = EvalOptions(ctx=ctx, chunks=chunks, placement=Placement(cpu=True))
    result = evaluate(ModelRef(str(model), "gguf", path=model), options, note=print_note, progress=lambda *_: None)
    return {"bytes": model.stat().st_size, **result.to_json()}


if __name__ == "__main__":
    main()
