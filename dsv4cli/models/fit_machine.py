"""`dsv4 quantize --fit`: the largest fitted quant that `dsv4 plan` says "fits" on a machine.

"fits" is the plan's verdict when every weight is in VRAM or RAM (`dsv4cli.plan.verdict`). For a budget B, the
least-loss mix of at most B bytes (`dsv4cli.models.fit`) has an exact tensor list (`quant.mapping`, the one the
converter writes), which `make_plan` places with the machine's inputs. The memory a mix needs grows with B, so the
largest B whose mix fits is bisected between the smallest mix and the lossless size, to 1/BRACKET of that range;
only a budget whose own plan fits is ever kept, so the answer fits even where the growth is not monotonic.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4cli.errors import PlanError, UsageError
from dsv4cli.models.fit import Fit, Measured, fit_measured
from dsv4cli.plan import Plan, PlanInputs, make_plan
from dsv4cli.plan.source import estimate_from_config
from dsv4cli.units import gib, human_bytes
from quant.allocate import size_range
from quant.convert import QuantOptions

BRACKET = 1000


@dataclass(frozen=True)
class MachineFit:
    """The chosen fit, its plan (verdict "fits") and how many budgets were planned to find it."""

    fit: Fit
    plan: Plan
    probes: int


def plan_of(measured: Measured, base: QuantOptions, inputs: PlanInputs, mix: dict[str, str] | None, name: str) -> Plan:
    """The plan of the GGUF that `base` with fitted `mix` writes (None: the recipe alone)."""
    source = estimate_from_config(measured.config, name=name, experts=base.experts, dense=base.dense, mix=mix)
    return make_plan(source, inputs)


def _fits(measured: Measured, base: QuantOptions, inputs: PlanInputs, fit: Fit | None, name: str) -> Plan | str:
    """The plan when it fits, else why not (the plan's error, or how much streams from disk and what would help)."""
    try:
        plan = plan_of(measured, base, inputs, fit.allocation.mix if fit else None, name)
    except PlanError as e:
        return str(e)
    disk = plan.tier("disk").weights
    return plan if not disk else f"{gib(disk)} of weights would stream from disk ({plan.hints[0]})"


def fit_machine(measured: Measured, base: QuantOptions, inputs: PlanInputs, name: str) -> MachineFit:
    """The largest budget whose least-loss mix the plan for `inputs` says fits; one-line errors when even the
    smallest mix does not fit, or when the lossless quant already does."""
    lossless = _fits(measured, base, inputs, None, name)
    if not isinstance(lossless, str):
        raise UsageError(
            f"--fit: the lossless quant ({human_bytes(measured.lossless)}) already fits this machine",
            hint="run `dsv4 quantize` without --fit to write it",
        )
    low, _ = size_range(measured.options, measured.fixed)
    best = fit_measured(measured, low, base)
    plan = _fits(measured, base, inputs, best, name)
    if isinstance(plan, str):
        raise UsageError(f"--fit: even the smallest mix ({human_bytes(low)}) does not fit this machine: {plan}")
    high, probes = measured.lossless - 1, 2
    while high - low > max(1, (measured.lossless - low) // BRACKET):
        mid = (low + high) // 2
        candidate = fit_measured(measured, mid, base)
        found = _fits(measured, base, inputs, candidate, name)
        probes += 1
        if isinstance(found, str):
            high = mid
        else:
            low, best, plan = mid, candidate, found
    return MachineFit(best, plan, probes)
