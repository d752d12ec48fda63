"""`dsv4 quantize --size`: the mix of types that fits a byte budget with the least measured loss.

Measures every fit group's options on the checkpoint (`quant.importance`, with the importance matrix given or
cached by `dsv4 imatrix` for this model's lossless GGUF, else the weights alone), allocates (`quant.allocate`) and
returns the converter options that write it. The header (metadata, tokenizer, tensor index, alignment) is counted,
so the file itself stays under the budget.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from dsv4cli.errors import UsageError
from dsv4cli.units import human_bytes
from quant.allocate import Allocation, allocate, size_range
from quant.convert import QuantOptions
from quant.fit_groups import fit_group
from quant.imatrix import Imatrix, load_imatrix
from quant.importance import Option, measure
from quant.mapping import facts_of, plan_tensors
from quant.recipes import DEFAULT_DENSE, DEFAULT_EXPERTS
from quant.safetensors import Checkpoint
from quant.source import SourceTensors
from quant.tokenizer import load_vocab

TENSOR_INDEX = 8 + 4 + 4 * 8 + 4 + 8  # per tensor: name length, n_dims, dims, type, offset (plus its name)
ALIGNMENT = 32


@dataclass(frozen=True)
class Fit:
    """The allocation, the bytes a lossless conversion would take, the imatrix used (None: weights alone)."""

    allocation: Allocation
    budget: int
    lossless: int
    imatrix: Path | None
    options: QuantOptions


def _value_bytes(value: object) -> int:
    if isinstance(value, str):
        return 8 + len(value.encode("utf-8"))
    if isinstance(value, (list, tuple)):
        return 12 + sum(_value_bytes(v) for v in value)
    return 8


def header_bytes(kv: list, names: list[str]) -> int:
    """An upper bound of a GGUF's bytes besides tensor data: key/values, tensor index, alignment padding."""
    kv_bytes = sum(8 + len(k.encode()) + 4 + _value_bytes(v) for k, v, *_ in kv)
    return 24 + kv_bytes + sum(TENSOR_INDEX + len(n) for n in names) + ALIGNMENT * (len(names) + 1)


@dataclass(frozen=True)
class Measured:
    """Every fit group's options, the bytes outside them (header, untouched tensors), the lossless total, and the
    checkpoint's config.json (for the tensor list of a mix)."""

    options: dict[str, list[Option]]
    fixed: int
    lossless: int
    config: dict
    imatrix: Path | None


def measure_fit(folder: Path, base: QuantOptions, imatrix: Path | None,
                progress: Callable[[str], None] | None = None) -> Measured:  # fmt: skip
    """Measure every fit group's loss in each candidate type on the checkpoint in `folder`."""
    ckpt = Checkpoint(folder)
    try:
        facts = facts_of(ckpt.config)
        plans = plan_tensors(ckpt.config, experts=DEFAULT_EXPERTS, dense=DEFAULT_DENSE, mtp=base.mtp)
        groups: dict[str, list] = defaultdict(list)
        for plan in plans:
            group = fit_group(plan.spec.name)
            if group is not None:
                groups[group].append(plan)
        matrix: Imatrix | None = load_imatrix(imatrix) if imatrix else None
        kv = load_vocab(ckpt.folder, ckpt.config).metadata()
        longest_mix = json.dumps(dict.fromkeys(groups, "iq2_xxs")) + json.dumps({"file": str(imatrix), "tokens": 0})
        header = header_bytes([*kv, ("meta", "x" * 4096 + longest_mix)], [p.spec.name for p in plans])
        fixed = header + sum(p.spec.nbytes for p in plans if fit_group(p.spec.name) is None)
        lossless = header + sum(p.spec.nbytes for p in plans)
        fp4 = facts["expert_dtype"] == "fp4"
        options = measure(SourceTensors(ckpt, facts), plans, groups, matrix, fp4_lossless=fp4,
                          experts_per_token=int(facts["num_experts_per_tok"]),
                          main_layers=int(facts["num_hidden_layers"]), workers=base.workers,
                          progress=progress)  # fmt: skip
        return Measured(options, fixed, lossless, ckpt.config, imatrix)
    finally:
        ckpt.close()


def fit_measured(measured: Measured, budget: int, base: QuantOptions) -> Fit:
    """The least-loss mix of at most `budget` bytes, with the converter options that write it."""
    smallest, _ = size_range(measured.options, measured.fixed)
    if budget < smallest or budget >= measured.lossless:
        raise UsageError(
            f"--size {human_bytes(budget)}: sizes from {human_bytes(smallest)} ({smallest} bytes) up to the lossless "
            f"{human_bytes(measured.lossless)} can be fitted",
            hint="above that, `dsv4 quantize` without --size writes the lossless quant",
        )
    allocation = allocate(measured.options, budget, measured.fixed)
    imatrix = measured.imatrix
    chosen = replace(
        base, mix=tuple(sorted(allocation.mix.items())), budget=budget, imatrix=str(imatrix) if imatrix else ""
    )
    return Fit(allocation, budget, measured.lossless, imatrix, chosen)


def fit(folder: Path, budget: int, base: QuantOptions, imatrix: Path | None,
        progress: Callable[[str], None] | None = None) -> Fit:  # fmt: skip
    """Measure, then allocate `budget` bytes over the fit groups of the checkpoint in `folder`."""
    return fit_measured(measure_fit(folder, base, imatrix, progress), budget, base)


def cached_imatrix(model: str) -> Path | None:
    """The matrix `dsv4 imatrix MODEL` cached for this model's lossless GGUF and the built-in text, if any."""
    from dsv4cli.models.calibration import TEXT
    from dsv4cli.models.imatrix import cache_path, lossless_gguf
    from dsv4cli.models.ref import resolve_model

    try:
        path = cache_path(lossless_gguf(resolve_model(model)), TEXT)
    except UsageError:
        return None
    return path if path.is_file() else None
