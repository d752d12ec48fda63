"""Does `dsv4 quantize --size`'s loss measure (`quant.importance`) predict what eval measures? Probes on bench/fit.py's
model (layers that differ on purpose): for each fit group and type, the lossless quant with only that group in that
type, judged by `dsv4 eval` against the lossless reference (KLD above the lossless quant's own), beside the loss the
allocator was given for that choice.

The allocator adds the losses of different groups and trades bytes between them, so it needs them in one unit: the
figure that matters is how far the ratio KLD / loss strays between probes (the standard deviation of its log10
over the probes eval can hear, KLD >= NOISE; 0 for a measure exactly proportional to KLD), then the rank
agreement (Spearman) of the two over all probes. At ctx 128 (the sliding window) the compressed KV is never read,
so the compressors' probes are under the noise: the measure rates them as attention inputs, for longer contexts.
Per group kind, the median ratio shows which kinds the measure over- or under-rates.

    .venv/bin/python bench/fit_probes.py [--models DIR] [--recipes iq2_xxs,q3_k,iq4_xs] [--ctx 128] [--chunks 4]
                                         [--json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from eval import convert, models_folder, parse_args
from fit import CONFIG, LAYER_GAINS, NAME, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NOISE = 1e-4  # KLD under this is eval's rounding (16-bit logits), not the probe
ROOT_TYPES = ("q4_k", "q5_k", "q6_k")  # the embeddings and the head take no type under 4.5 bits


def main() -> None:
    args = parse_args(__doc__, "iq2_xxs,q3_k,iq4_xs", "the types each group is probed in, comma-separated")
    with models_folder(args.models) as folder:
        rows = run(folder, args.recipes.split(","), args.ctx, args.chunks)
    kld = np.array([r["kld"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    ratio = np.log10(np.maximum(kld, 1e-9) / np.maximum(loss, 1e-30))
    heard = kld >= NOISE
    summary = {"log10_ratio_spread": float(ratio[heard].std()), "spearman": spearman(kld, loss), "probes": len(rows),
               "under_noise": int((~heard).sum())}  # fmt: skip
    if args.json:
        print(json.dumps({"summary": summary, "probes": rows}, indent=2))
        return
    print(f"{'group':<16}{'type':<9}{'MiB':>8}{'KLD':>10}{'loss':>12}{'log10 ratio':>13}")
    for r, q in zip(rows, ratio, strict=True):
        size = r["bytes"] / 2**20
        print(f"{r['group']:<16}{r['recipe']:<9}{size:>8.1f}{r['kld']:>10.5f}{r['loss']:>12.4g}{q:>13.2f}")
    for kind in sorted({r["group"].split(".")[0] for r in rows}):
        mine = [q for r, q in zip(rows, ratio, strict=True) if r["group"].split(".")[0] == kind]
        print(f"  {kind:<14} median log10(KLD / loss) {float(np.median(mine)):+.2f}")
    print(f"spread of log10(KLD / loss): {summary['log10_ratio_spread']:.2f} over the {int(heard.sum())} probes "
          f"with KLD >= {NOISE}; Spearman over all {len(rows)}: {summary['spearman']:.3f}")  # fmt: skip


def run(folder: Path, recipes: list[str], ctx: int, chunks: int) -> list[dict]:
    """One row per (group, type): the probe's KLD above the lossless quant's, and the measured loss of that choice."""
    from dsv4cli.models.fit import measure_fit
    from dsv4cli.models.imatrix import make_imatrix
    from quant.convert import QuantOptions, quantize_checkpoint

    convert(folder, "mxfp4", "bf16", name=NAME, config=CONFIG, layer_gains=LAYER_GAINS)  # eval's reference
    lossless = convert(folder, "mxfp4", "q8_0", name=NAME, config=CONFIG, layer_gains=LAYER_GAINS)
    matrix, _, _ = make_imatrix(str(lossless), max_chunks=chunks)
    measured = measure_fit(folder / NAME, QuantOptions(), matrix)
    base = evaluate(lossless, ctx, chunks)["kld_mean"]
    rows = []
    for group, options in measured.options.items():
        kind = group.split(".")[0]
        for option in options:
            if option.recipe not in (ROOT_TYPES if kind in ("embeddings", "output") else recipes):
                continue
            probe = folder / f"{NAME}-probe-{group}-{option.recipe}.gguf"
            if not probe.is_file():
                mix = ((group, option.recipe),)
                quantize_checkpoint(folder / NAME, probe, QuantOptions(mix=mix, imatrix=str(matrix)))
            found = evaluate(probe, ctx, chunks)
            rows.append({"group": group, "recipe": option.recipe, "bytes": option.nbytes,
                         "kld": found["kld_mean"] - base, "loss": option.loss})  # fmt: skip
    return rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties broken by order: the figures are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


if __name__ == "__main__":
    main()
