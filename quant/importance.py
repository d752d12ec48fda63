"""Measured sensitivity: for each fit group (`quant.fit_groups`) and each candidate type, the expected loss of
fidelity if the group is stored in that type, and its exact size.

Per matrix, the importance-weighted squared quantization error Σ_rows Σ_cols (w - q(w))² · E[x²]_col is the
error power the quantized matmul adds to its output per token (inputs taken as uncorrelated), with E[x²] from the
importance matrix (`quant.imatrix`; all ones without one: the weights alone); the same sum over w² is the output's
own power. Their ratio, times the power of what carries the error into the residual stream, is the loss (see
`measure`), so a layer's tensors weigh by what that layer writes, and a routed expert by the tokens that reach it
(its share of the calibration tokens). Measured, not modelled: a sample of rows of each tensor (of a few experts,
spread over the layer) is quantized with each type as the converter would, and scaled to the whole tensor; bench/
fit_probes.py checks the losses against eval's KL divergence, one quantized group at a time.
Streaming: one tensor's sample in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from quant.fit_groups import ATTENTION_OUT, FFN_OUT, KEEP, group_kind, writer_of
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
    return _power(dequantize(q, t).reshape(x.shape) - x, imp)


@dataclass
class _Sampled:
    """One matrix's figures per token, scaled from its sampled rows to the whole: a dense tensor, or one sampled
    routed expert (then `share` is the tokens that reach it per token, times the experts it stands for). `signal`:
    its output's expected power; `error`: per candidate, the power quantization adds to it."""

    signal: float
    error: dict[str, float]
    share: float = 1.0

    @property
    def power(self) -> float:
        """What this matrix writes per token (for a writer: into the residual stream)."""
        return self.share * self.signal


def measure(
    source: SourceTensors,
    plans: list[TensorPlan],
    groups: dict[str, list[TensorPlan]],
    imatrix: Imatrix | None,
    *,
    fp4_lossless: bool,
    experts_per_token: int,
    main_layers: int,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[Option]]:
    """Every group's options (size and measured loss for each candidate recipe, and keeping the lossless types).

    A loss is the error power a choice leaves in the residual stream at the end, per token, so groups compare: an
    error is taken relative to its matrix's output and scaled by the power that carries it there (`_carried`).
    Layers that write more into the stream, or write it early, and experts that more tokens reach weigh more, in
    all their tensors. `main_layers`: blocks past it (the MTP block) are not on the main model's path. Tensors are
    sampled on `workers` threads."""
    names_of = {group: candidates(group, imatrix=imatrix is not None) for group in groups}
    sampled: dict[str, list[_Sampled]] = {}
    with ThreadPoolExecutor(workers) as pool:  # ggml's quantizers and numpy release the GIL
        pending = []
        for group, members in groups.items():
            for plan in members:
                importance = imatrix.importance(plan.spec.name) if imatrix is not None else None
                args = (source, plan, names_of[group], importance, imatrix, fp4_lossless, experts_per_token)
                pending.append((group, plan.spec.name, pool.submit(_sample, *args)))
        for i, (group, name, future) in enumerate(pending):
            if progress and (i == 0 or pending[i - 1][0] != group):
                progress(group)
            sampled[name] = future.result()
    carried = _carried(sampled, main_layers)
    out: dict[str, list[Option]] = {}
    for group, members in groups.items():
        names = names_of[group]
        losses = dict.fromkeys(names, 0.0)
        sizes = dict.fromkeys(names, 0)
        kept = Option(KEEP, 0, 0.0)
        for plan in members:
            found = _losses(plan.spec.name, sampled, carried)
            for name in names:
                sizes[name] += nbytes_of(plan.spec.ne, fit_type(RECIPES[name].ggml_type, plan.spec.ne[0]))
                losses[name] += found[name]
            as_laid_out = BY_TYPE.get(plan.spec.ggml_type)  # Q8_0 or MXFP4: a candidate; BF16 and F32 lose nothing
            loss = found.get(as_laid_out.name, 0.0) if as_laid_out is not None else 0.0
            kept = Option(KEEP, kept.nbytes + plan.spec.nbytes, kept.loss + loss)
        options = [Option(n, sizes[n], losses[n]) for n in names]
        # keeping the lossless types is an option where it is larger than every candidate (BF16 or F32 tensors:
        # compressors, hyper-connection mixers, embeddings, head), so budgets up to the lossless size can fill
        out[group] = options + ([kept] if kept.nbytes > max(o.nbytes for o in options) else [])
    return out


def _carried(sampled: dict[str, list[_Sampled]], main_layers: int) -> dict[str, list[float]]:
    """Per tensor (per sampled matrix: an expert's gate and up ride on that expert's down projection), the power
    that carries its relative error to the output.

    An error of power E added to the residual stream where the stream holds P grows to E * P_end / P by the end:
    every later layer reads the stream normalized, so it takes the same relative error into what it writes. So a
    path's error counts at the power its writer adds times P_end over the stream's power just after that layer; a
    hyper-connection mixer's at the power of the writers it mixes in (the attention's, or the feed-forward's) the
    same way; the embeddings' and the head's at P_end."""

    def power(name: str) -> float:
        return sum(m.power for m in sampled.get(name, []))

    added = [("token_embd.weight",)]
    layers = range(main_layers)
    for layer in layers:
        added += [(f"blk.{layer}.{ATTENTION_OUT}.weight",), tuple(f"blk.{layer}.{w}.weight" for w in FFN_OUT)]
    after, total = {}, 0.0
    for writers in added:
        total += sum(power(w) for w in writers)
        after.update(dict.fromkeys(writers, total))
    end = total
    grown = {name: end / max(p, 1e-30) for name, p in after.items()}
    carried = {name: [m.power * grown[name] for m in ms] for name, ms in sampled.items() if name in grown}
    for layer in layers:
        for mixer, writers in (("hc_attn_fn", (ATTENTION_OUT,)), ("hc_ffn_fn", FFN_OUT)):
            names = [f"blk.{layer}.{w}.weight" for w in writers]
            mixed = sum(power(w) for w in names)
            carried[f"blk.{layer}.{mixer}.weight"] = [mixed * grown[names[0]]]
    for name in sampled:
        if not name.startswith("blk.") and name not in carried:  # the head and its mixer
            carried[name] = [end]
    return carried


def _losses(name: str, sampled: dict[str, list[_Sampled]], carried: dict[str, list[float]]) -> dict[str, float]:
    """Tensor `name`'s loss per candidate: each matrix's relative error times the power that carries it."""
    by = carried.get(writer_of(name)) or [m.power for m in sampled[name]]
    losses: dict[str, float] = {}
    for i, m in enumerate(sampled[name]):
        power = by[i] if len(by) > 1 else by[0]  # per expert, or one for the tensor
        for recipe, error in m.error.items():
            losses[recipe] = losses.get(recipe, 0.0) + error / max(m.signal, 1e-30) * power
    return losses


def _sample(
    source: SourceTensors,
    plan: TensorPlan,
    names: tuple[str, ...],
    importance: np.ndarray | None,
    imatrix: Imatrix | None,
    fp4_lossless: bool,
    k: int,
) -> list[_Sampled]:
    """One tensor's figures from a sample of its rows (and of its experts, in expert order)."""
    if plan.kind != "experts":
        rows = source.rows(plan.sources[0])
        picks = _rows(rows)
        x = np.concatenate([np.concatenate([source.floats(s, int(r), int(r) + 1) for s in plan.sources], axis=1)
                            for r in picks])  # fmt: skip
        groups = 1 if importance is None else importance.shape[0]
        per = rows // groups  # the grouped output projection: each row with its group's importance
        parts = [(x[picks // per == g], None if importance is None else importance[g]) for g in range(groups)]
        parts = [(rows_g, w) for rows_g, w in parts if len(rows_g)]
        scale = rows / len(picks)
        share = 1 / rows if plan.spec.name == "token_embd.weight" else 1.0  # a token reads one row of the table
        signal = scale * sum(_power(rows_g, w) for rows_g, w in parts)
        error = {n: scale * sum(_weighted_sse(rows_g, n, w) for rows_g, w in parts) for n in names}
        return [_Sampled(signal, error, share)]
    n_exp = len(plan.sources)
    experts = np.unique(np.linspace(0, n_exp - 1, min(n_exp, SAMPLE_EXPERTS)).astype(np.int64))
    counts = imatrix.counts.get(plan.spec.name) if imatrix is not None else None
    tokens = imatrix.tokens if counts is not None and counts.sum() and imatrix is not None else 0
    out = []
    for e in experts:
        name_e = plan.sources[int(e)]
        rows = source.rows(name_e)
        picks = _rows(rows)
        x = np.concatenate([source.floats(name_e, int(r), int(r) + 1) for r in picks])
        share = (counts[e] / tokens if tokens else k / n_exp) * n_exp / len(experts)
        w = None if importance is None else importance[int(e)]
        lossless = fp4_lossless and source.ckpt.info(name_e).dtype == "I8"
        error = {n: 0.0 if lossless and n == "mxfp4" else rows / len(picks) * _weighted_sse(x, n, w) for n in names}
        out.append(_Sampled(rows / len(picks) * _power(x, w), error, share))
    return out


def _power(x: np.ndarray, weights: np.ndarray | None) -> float:
    """Σ_rows Σ_cols w² · E[x²]_col: the expected power of these rows' outputs per token."""
    imp = weights if weights is not None else np.ones(x.shape[1], dtype=np.float32)
    return float(((x.astype(np.float64) ** 2) * imp[None, :]).sum())
