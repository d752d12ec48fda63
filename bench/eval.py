"""What each recipe `dsv4 quantize` can write costs in fidelity, on a model at V4-Flash's real widths.

The generated checkpoint of `bench_models.REAL_CONFIG` (FP4 experts, FP8 dense; random weights) is converted with
every expert x dense recipe and each conversion is measured by `dsv4 eval` against the lossless one (MXFP4 experts,
BF16 dense), on the built-in text. Prints one row per recipe: file size, mean / p99 KLD, top-1 agreement and the
PPL ratio. Random weights give flat distributions, so the absolute figures are far from a trained model's; the
order of the recipes is what this shows.

    .venv/bin/python bench/eval.py [--models DIR] [--recipes mxfp4/q8_0,q4_0/q8_0] [--ctx 128] [--chunks 4] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench_models import REAL_CONFIG

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def convert(
    folder: Path,
    experts: str,
    dense: str,
    *,
    name: str = "bench-real",
    config: dict = REAL_CONFIG,
    layer_gains: tuple[float, ...] = (),
) -> Path:
    """The generated checkpoint `name` (`config`, `layer_gains`) converted with one recipe (kept in `folder` once
    written)."""
    from dsv4cli.models.registry import ModelSpec
    from dsv4cli.models.tiny import write_tiny_checkpoint
    from quant.convert import QuantOptions, quantize_checkpoint

    checkpoint = folder / name
    if not (checkpoint / "config.json").is_file():
        spec = ModelSpec(name=name, builtin=True, config=config)
        write_tiny_checkpoint(spec, checkpoint, max_params=None, layer_gains=layer_gains)
    out = folder / f"{name}-{experts}-{dense}.gguf"
    if not out.is_file():
        quantize_checkpoint(checkpoint, out, QuantOptions(experts=experts, dense=dense))
    return out


def parse_args(
    doc: str | None, recipes: str, recipes_help: str, switches: dict[str, str] | None = None
) -> argparse.Namespace:
    """The flags bench/eval.py and bench/fit.py share: where models are kept, which recipes, context and chunks;
    and a script's own on/off `switches` (flag -> help)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="keep the generated models here between runs")
    parser.add_argument("--recipes", default=recipes, help=recipes_help)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    for flag, text in (switches or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    return parser.parse_args()


@contextlib.contextmanager
def models_folder(models: Path | None) -> Iterator[Path]:
    """`--models`, or a temporary folder for this run; the dsv4 home (eval's caches) inside it unless one is set."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = models or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("DSV4_HOME", str(folder / "home"))
        yield folder


def main() -> None:
    from quant.recipes import DENSE_RECIPES, EXPERT_RECIPES

    every = [f"{e}/{d}" for e in EXPERT_RECIPES for d in DENSE_RECIPES if (e, d) != ("mxfp4", "bf16")]
    args = parse_args(__doc__, ",".join(every), "EXPERTS/DENSE,... (default: every recipe)")
    with models_folder(args.models) as folder:
        rows = [measure(folder, recipe, args.ctx, args.chunks) for recipe in args.recipes.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'recipe':<14}{'size MiB':>10}{'KLD mean':>11}{'KLD p99':>10}{'top-1':>8}{'PPL ratio':>11}")
    for r in rows:
        print(
            f"{r['recipe']:<14}{r['bytes'] / 2**20:>10.1f}{r['kld_mean']:>11.5f}{r['kld_p99']:>10.5f}"
            f"{r['top1']:>8.1%}{r['ppl'] / r['ppl_ref']:>11.4f}"
        )


def measure(folder: Path, recipe: str, ctx: int, chunks: int) -> dict:
    from dsv4cli.eval.run import EvalOptions, evaluate
    from dsv4cli.load.placement import Placement
    from dsv4cli.models.ref import ModelRef

    experts, dense = recipe.split("/")
    convert(folder, "mxfp4", "bf16")  # the reference, converted here rather than by eval (same converter)
    model = convert(folder, experts, dense)
    options = EvalOptions(ctx=ctx, chunks=chunks, placement=Placement(cpu=True))
    result = evaluate(ModelRef(str(model), "gguf", path=model), options, note=print_note, progress=lambda *_: None)
    return {"recipe": recipe, "bytes": model.stat().st_size, **result.to_json()}


def print_note(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    main()
