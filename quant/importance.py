"""Measured sensitivity: for each fit group (`quant.fit_groups`) and each candidate type, the expected loss of
fidelity if the group is stored in that type, and its exact size.

The loss is the importance-weighted squared quantization error, Σ_rows Σ_cols (w - q(w))² · E[x²]_col, i.e. the
expected squared error the quantized matmul adds to its output per token (inputs taken as uncorrelated), with
E[x²] from the importance matrix (`quant.imatrix`; all ones without one: the weights alone). A routed expert's
term is scaled by how often tokens reach it (its share of the calibration tokens), so rarely used experts cost
less (the router's output weight is left out). It is measured, not modelled: a sample of rows of each tensor (of
a few experts, spread over the layer) is quantized with each type as the converter would, and the sample's error
is scaled to the whole tensor.
Streaming: one tensor's sample in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quant.fit_groups import KEEP, group_kind
from quant.imatrix import Imatrix
from quant.mapping import TensorPlan, fit_type, nbytes_of
from quant.quantizers import dequantize, quantize
from quant.recipes import BY_TYPE, DENSE, EXPERTS, RECIPES
from quant.source import SourceTensors

SAMPLE_ROWS = 64
SAMPLE_EXPERTS = 4
ROOT_MIN_BITS = 4.5  # embeddings and output: nothing under Q4_K, and no i-quants (no imatrix rows for them)
DENSE_MAX_BITS = 8.5  # BF16 is the lossless reference, not a fitted choice


@dataclass
class Option:
    """One choice for a group: its recipe name, total bytes and expected loss."""

    recipe: str
    nbytes: int
    loss: float


def candidates(group: str, *, imatrix: bool) -> tuple[str, ...]:
    """The registered recipes a group may take, smallest first; the i-quants only with an importance matrix."""
    kind = group_kind(group)
    if kind == "experts":
        fits = [r for r in RECIPES.values() if EXPERTS in r.roles]
    elif kind in ("embeddings", "output"):
        fits = [r for r in RECIPES.values() if DENSE in r.roles and not r.needs_imatrix]
        fits = [r for r in fits if r.bits_per_weight >= ROOT_MIN_BITS]
    else:
        fits = [r for r in RECIPES.values() if DENSE in r.roles and r.bits_per_weight <= DENSE_MAX_BITS]
    names = [r.name for r in sorted(fits, key=lambda r: r.bits_per_weight)]
    return tuple(n for n in names if imatrix or not RECIPES[n].needs_imatrix)


def _rows(n: int) -> np.ndarray:
    """Up to SAMPLE_ROWS row indices spread evenly over n rows."""
    return np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).astype(np.int64))


def _weighted_sse(x: np.ndarray, recipe: str, weights: np.ndarray | None) -> float:
    t = fit_type(RECIPES[recipe].ggml_type, x.shape[1])
    imp = weights if weights is not None else np.ones(x.shape[1], dtype=np.float32)
    needs = RECIPES[recipe].needs_imatrix or RECIPES[recipe].quantizer == "ggml"
    q = quantize(x, t, imatrix=imp if needs and t == RECIPES[recipe].ggml_type else None)
    err = dequantize(q, t).reshape(x.shape) - x
    return float(((err.astype(np.float64) ** 2) * imp[None, :]).sum())


def measure(
    source: SourceTensors,
    plans: list[TensorPlan],
    groups: dict[str, list[TensorPlan]],
    imatrix: Imatrix | None,
    *,
    fp4_lossless: bool,
    experts_per_token: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[Option]]:
    """Every group's options (size and measured loss for each candidate recipe, and keeping the lossless types)."""
    out: dict[str, list[Option]] = {}
    for group, members in groups.items():
        if progress:
            progress(group)
        names = candidates(group, imatrix=imatrix is not None)
        losses = dict.fromkeys(names, 0.0)
        sizes = dict.fromkeys(names, 0)
        kept = Option(KEEP, 0, 0.0)
        for plan in members:
            for name in names:
                sizes[name] += nbytes_of(plan.spec.ne, fit_type(RECIPES[name].ggml_type, plan.spec.ne[0]))
            importance = imatrix.importance(plan.spec.name) if imatrix is not None else None
            found = _tensor_losses(source, plan, names, importance, imatrix, fp4_lossless, experts_per_token)
            for name, loss in found.items():
                losses[name] += loss
            as_laid_out = BY_TYPE.get(plan.spec.ggml_type)  # Q8_0 or MXFP4: a candidate; BF16 and F32 lose nothing
            loss = found.get(as_laid_out.name, 0.0) if as_laid_out is not None else 0.0
            kept = Option(KEEP, kept.nbytes + plan.spec.nbytes, kept.loss + loss)
        options = [Option(n, sizes[n], losses[n]) for n in names]
        # keeping the lossless types is an option where it is larger than every candidate (BF16 or F32 tensors:
        # compressors, hyper-connection mixers, embeddings, head), so budgets up to the lossless size can fill
        out[group] = options + ([kept] if kept.nbytes > max(o.nbytes for o in options) else [])
    return out


def _tensor_losses(
    source: SourceTensors,
    plan: TensorPlan,
    names: tuple[str, ...],
    importance: np.ndarray | None,
    imatrix: Imatrix | None,
    fp4_lossless: bool,
    k: int,
) -> dict[str, float]:
    """Expected loss of one tensor in each recipe, from a sample of its rows (and experts)."""
    if plan.kind != "experts":
        rows = source.rows(plan.sources[0])
        picks = _rows(rows)
        x = np.concatenate([np.concatenate([source.floats(s, int(r), int(r) + 1) for s in plan.sources], axis=1)
                            for r in picks])  # fmt: skip
        groups = 1 if importance is None else importance.shape[0]
        scale = rows / len(picks)
        losses = {}
        for name in names:
            if groups == 1:
                losses[name] = scale * _weighted_sse(x, name, None if importance is None else importance[0])
            else:  # grouped output projection: each row with its group's importance
                per = rows // groups
                losses[name] = scale * sum(
                    _weighted_sse(x[picks // per == g], name, importance[g])
                    for g in range(groups)
                    if (picks // per == g).any()
                )
        return losses
    n_exp = len(plan.sources)
    experts = np.unique(np.linspace(0, n_exp - 1, min(n_exp, SAMPLE_EXPERTS)).astype(np.int64))
    counts = imatrix.counts.get(plan.spec.name) if imatrix is not None else None
    tokens = imatrix.tokens if counts is not None and counts.sum() and imatrix is not None else 0
    losses = dict.fromkeys(names, 0.0)
    for e in experts:
        name_e = plan.sources[int(e)]
        rows = source.rows(name_e)
        picks = _rows(rows)
        x = np.concatenate([source.floats(name_e, int(r), int(r) + 1) for r in picks])
        share = counts[e] / tokens if tokens else k / n_exp  # tokens reaching it per token
        w = None if importance is None else importance[int(e)]
        for name in names:
            lossless = fp4_lossless and name == "mxfp4" and source.ckpt.info(name_e).dtype == "I8"
            if not lossless:
                losses[name] += share * (rows / len(picks)) * _weighted_sse(x, name, w)
    return {n: v * n_exp / len(experts) for n, v in losses.items()}
