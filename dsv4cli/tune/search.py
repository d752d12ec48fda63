"""The search: coordinate descent from the plan's own settings, inside a time budget (not a grid).

Each setting in turn (`settings.dimensions`) takes each of its candidates with the others held at the best so
far; a candidate replaces the best when it is ahead by more than the noise on the geometric mean of decode and
prefill speed and neither falls behind by more than twice the noise. The noise is the larger of NOISE_FLOOR and
the typical spread of llama-bench's repetitions. The winner and the start are then measured once more, and the
winner is kept only if it is still ahead on both runs together: a lucky first run (a quiet moment on a shared
machine) does not change a default. A candidate is tried only when the time left covers it and that
confirmation, each like the slowest run so far; a winner that could not be measured again is not kept.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsv4cli.tune.bench import BenchError, Measurement
from dsv4cli.tune.settings import Settings, with_value

NOISE_FLOOR = 0.03  # 3 %: below this two runs of the same settings are not told apart on a quiet machine
CONFIRM_RUNS = 3  # a candidate is tried only with time left for it and for measuring the start and it again


@dataclass
class Trial:
    settings: Settings
    measurement: Measurement | None
    error: str | None = None
    kept: bool = False


@dataclass
class SearchResult:
    start: Settings
    best: Settings
    start_measurement: Measurement
    best_measurement: Measurement
    noise: float
    trials: list[Trial] = field(default_factory=list)
    stopped: str = "done"  # done | budget

    @property
    def speedup(self) -> tuple[float, float]:
        """(decode, prefill) of the best over the start."""
        b, s = self.best_measurement, self.start_measurement
        return b.tg_tps / s.tg_tps, b.pp_tps / s.pp_tps


def ahead(new: Measurement, old: Measurement, noise: float) -> bool:
    """`new` is faster beyond the noise on decode and prefill together and not slower beyond it on either."""
    tg, pp = new.tg_tps / old.tg_tps, new.pp_tps / old.pp_tps
    return math.sqrt(tg * pp) > 1 + noise and min(tg, pp) > 1 - 2 * noise


def search(
    start: Settings,
    dims: list[tuple[str, tuple[Any, ...]]],
    measure: Callable[[Settings, float], Measurement],
    *,
    deadline: float,
    accept: Callable[[Settings, Settings, float], bool] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> SearchResult:
    """Coordinate descent; `measure(settings, deadline)` runs one benchmark that ends by `deadline` (monotonic),
    `accept(candidate, current, deadline)` may refuse a faster candidate (the output check of a quantized cache)."""
    trials: list[Trial] = []
    costs: list[float] = []

    def run(settings: Settings) -> Measurement | None:
        began = time.monotonic()
        if costs and began + max(costs) > deadline:
            return None
        try:
            m = measure(settings, deadline)
        except BenchError as e:
            trials.append(Trial(settings, None, str(e)))
            progress(f"  {settings.label()}: {e}")
            costs.append(time.monotonic() - began)
            return None
        costs.append(m.seconds)
        trials.append(Trial(settings, m))
        progress(f"  {settings.label()}: decode {m.tg_tps:.2f} tok/s, prefill {m.pp_tps:.1f} tok/s")
        return m

    first = run(start)
    if first is None:
        reason = trials[-1].error if trials else "no time left"
        raise BenchError(
            f"could not measure the plan's own settings: {reason}",
            hint="give a longer --budget (other processes on this machine slow llama-bench down)",
        )
    best, best_m = start, first
    stopped = "done"
    for name, values in dims:
        for value in values:
            candidate = with_value(best, name, value)
            if candidate == best or not candidate.valid() or any(t.settings == candidate for t in trials):
                continue
            if time.monotonic() + CONFIRM_RUNS * max(costs) > deadline:  # keep room to confirm a winner
                stopped = "budget"
                break
            m = run(candidate)
            if m is None or not ahead(m, best_m, _noise(trials)):
                continue
            if accept is not None and not accept(candidate, best, deadline):
                progress(f"  {candidate.label()}: faster, but its output differs; not kept")
                continue
            trials[-1].kept = True
            best, best_m = candidate, m
        if stopped == "budget":
            break
    noise = _noise(trials)
    start_m = first
    if best != start:
        progress("  confirming: the start and the best once more")
        again_start, again_best = run(start), run(best)
        confirmed = again_start is not None and again_best is not None
        if confirmed:
            start_m, best_m = _best_of(first, again_start), _best_of(best_m, again_best)
        if not confirmed or not ahead(best_m, start_m, noise):
            progress("  the best is not ahead of the start on a second run: keeping the start")
            best, best_m = start, start_m
    return SearchResult(start, best, start_m, best_m, noise, trials, stopped)


def _noise(trials: list[Trial]) -> float:
    spreads = [t.measurement.spread for t in trials if t.measurement]
    return max(NOISE_FLOOR, statistics.median(spreads)) if spreads else NOISE_FLOOR


def _best_of(a: Measurement, b: Measurement) -> Measurement:
    return Measurement(max(a.pp_tps, b.pp_tps), max(a.tg_tps, b.tg_tps), max(a.spread, b.spread), b.seconds)
