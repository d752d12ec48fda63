"""A type per fit group under a size budget, minimising the summed expected loss (`quant.importance`).

A multiple-choice knapsack, solved by dynamic programming over the budget cut into BINS steps, every option's
size rounded up to whole steps (so the exact total never exceeds the budget; at most one step per group is lost
to rounding), then the rounding loss is spent: repeatedly the upgrade with the largest loss reduction that still
fits in the exact bytes left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from quant.errors import UnsupportedError
from quant.importance import Option

BINS = 1 << 16


@dataclass(frozen=True)
class Allocation:
    """The chosen recipe per group, the total bytes (tensors + fixed + header) and the summed loss."""

    mix: dict[str, str]
    nbytes: int
    loss: float


def size_range(options: dict[str, list[Option]], fixed: int) -> tuple[int, int]:
    """(smallest, largest) total bytes any mix has."""
    return (
        fixed + sum(min(o.nbytes for o in opts) for opts in options.values()),
        fixed + sum(max(o.nbytes for o in opts) for opts in options.values()),
    )


def allocate(options: dict[str, list[Option]], budget: int, fixed: int) -> Allocation:
    """The mix of least summed loss whose total (tensors + `fixed`) is at most `budget` bytes."""
    smallest, _ = size_range(options, fixed)
    if budget < smallest:
        raise UnsupportedError(f"--size {budget}: the smallest mix is {smallest} bytes; choose at least that")
    groups = list(options)
    step = max((budget - fixed) / BINS, 1.0)
    best = np.zeros(BINS + 1)
    picks = []
    for g in groups:
        new = np.full(BINS + 1, np.inf)
        pick = np.zeros(BINS + 1, dtype=np.int16)
        for i, o in enumerate(options[g]):
            cost = math.ceil(o.nbytes / step)
            if cost > BINS:
                continue
            cand = np.full(BINS + 1, np.inf)
            cand[cost:] = best[: BINS + 1 - cost] + o.loss
            better = cand < new
            new[better], pick[better] = cand[better], i
        best = new
        picks.append(pick)
    b = int(np.argmin(best[: int((budget - fixed) // step) + 1]))
    chosen: dict[str, Option] = {}
    for g, pick in zip(reversed(groups), reversed(picks), strict=True):
        o = options[g][int(pick[b])]
        chosen[g] = o
        b -= math.ceil(o.nbytes / step)
    spare = budget - fixed - sum(o.nbytes for o in chosen.values())
    chosen = _fill(options, chosen, spare)
    nbytes = fixed + sum(o.nbytes for o in chosen.values())
    return Allocation({g: chosen[g].recipe for g in groups}, nbytes, sum(o.loss for o in chosen.values()))


def _fill(options: dict[str, list[Option]], chosen: dict[str, Option], spare: int) -> dict[str, Option]:
    """Spend the bytes the hull steps leave: repeatedly the option (off the hull too) with the largest loss
    reduction that fits in what is left."""
    chosen = dict(chosen)
    while True:
        moves = [
            (chosen[g].loss - o.loss, g, o)
            for g, opts in options.items()
            for o in opts
            if o.loss < chosen[g].loss and 0 < o.nbytes - chosen[g].nbytes <= spare
        ]
        if not moves:
            return chosen
        _, g, o = max(moves, key=lambda m: m[0])
        spare -= o.nbytes - chosen[g].nbytes
        chosen[g] = o
