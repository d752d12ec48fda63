"""`tune_model`: measure this machine's best load settings for a model and cache them for plan, chat and serve.

Steps: resolve MODEL to its GGUF (as chat does), plan it with the default rules (`untuned`: the start), search
(`search`) with the engine build's llama-bench, each candidate planned through `make_plan` so what is measured is
exactly what a plan applies, check a quantized KV cache's output (`check`), write the result (`cache`), and,
when the budget has room, calibrate the speed model at the tuned thread count so the plan predicts the tuned
settings.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4cli.engine.params import LoadParams
from dsv4cli.errors import UsageError
from dsv4cli.tune.bench import Measurement, run_bench
from dsv4cli.tune.check import same_output
from dsv4cli.tune.search import SearchResult, Trial, search
from dsv4cli.tune.settings import CPU_UBATCHES, GPU_UBATCHES, Settings, dimensions

if TYPE_CHECKING:
    from dsv4cli.load.placement import Placement
    from dsv4cli.models.ref import ModelRef
    from dsv4cli.plan.model import Plan, PlanInputs
    from dsv4cli.plan.source import ModelSource

DEFAULT_BUDGET_S = 300.0
MIN_BUDGET_S = 5.0
QUICK_BUDGET_S = 120.0  # below this, shorter tests and one repetition: fewer, noisier figures
CALIBRATE_S = 180.0  # what calibrating the speed model at a new thread count may need on a busy machine


@dataclass
class TuneResult:
    model: Path
    search: SearchResult
    cache_file: Path | None
    seconds: float
    budget_s: float
    bench: dict[str, Any]  # the llama-bench binary and test sizes
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        s = self.search
        tg, pp = s.speedup
        return {
            "model": str(self.model),
            "start": s.start.to_dict(),
            "tuned": s.best.to_dict(),
            "start_measured": s.start_measurement.to_dict(),
            "tuned_measured": s.best_measurement.to_dict(),
            "speedup": {"decode": round(tg, 3), "prefill": round(pp, 3)},
            "noise": round(s.noise, 4),
            "trials": [_trial(t) for t in s.trials],
            "stopped": s.stopped,
            "seconds": round(self.seconds, 1),
            "budget_s": self.budget_s,
            "bench": self.bench,
            "cache_file": str(self.cache_file) if self.cache_file else None,
            "notes": self.notes,
        }


def _trial(t: Trial) -> dict[str, Any]:
    measured = t.measurement.to_dict() if t.measurement else None
    return {"settings": t.settings.to_dict(), "measured": measured, "error": t.error, "kept": t.kept}


def settings_of(plan: Plan) -> Settings:
    """The settings a plan applies (its load parameters), as the search sees them."""
    params = plan.load_params()
    gpu = plan.n_gpu_layers > 0 and any(t.kind == "gpu" for t in plan.tiers)
    return Settings(
        flash_attn=params.flash_attn,
        threads=params.n_threads,
        repack=params.repack(),
        ubatch=params.n_ubatch,
        kv_type=params.kv_type,
        mmap=params.use_mmap,
        gpu_expert_layers=plan.source.dims.n_layer - len(plan.cpu_expert_layers) if gpu else None,
    )


def plan_for(src: ModelSource, inputs: PlanInputs, settings: Settings) -> Plan:
    """The plan with `settings` given as flags (so nothing cached or defaulted replaces them)."""
    from dsv4cli.plan import make_plan

    fixed = dataclasses.replace(inputs, untuned=True, **settings.to_dict())
    return make_plan(src, fixed)


def tune_model(
    ref: ModelRef | None,
    placement: Placement,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    progress: Callable[[str], None] = lambda _: None,
) -> TuneResult:
    """Search this machine's fastest settings for MODEL within `budget_s` seconds and cache them."""
    from dsv4cli.home import dsv4_home
    from dsv4cli.load.model_file import open_model_file
    from dsv4cli.load.resolve import resolve_gguf
    from dsv4cli.plan import make_plan
    from dsv4cli.plan.tuning import tune_key
    from dsv4cli.system import hardware, llama_lib
    from dsv4cli.toolchain.build import EngineError, find_engine
    from dsv4cli.tune import cache

    if budget_s < MIN_BUDGET_S:
        raise UsageError(f"--budget {budget_s:g}s is too short to measure anything", hint="give at least 5s")
    began = time.monotonic()
    deadline = began + budget_s
    if placement.plan_file:
        raise UsageError("--plan fixes every setting; tune the placement flags instead (--vram/--ram/--ctx/--cpu)")
    gguf = resolve_gguf(ref, note=progress)
    engine = find_engine()
    binary = engine.tool("llama-bench")
    if not binary.is_file():
        raise EngineError(f"{binary} is missing from the engine build", hint="run `dsv4 engine build` again")
    src = open_model_file(gguf).source  # checked: a file llama.cpp would abort on is refused here
    inputs = dataclasses.replace(placement.plan_inputs(), untuned=True)
    start_plan = make_plan(src, inputs)
    start = settings_of(start_plan)
    dims = dimensions(
        start,
        physical=hardware.cpu_threads(),
        logical=_logical_cpus(),
        repack_ok=llama_lib.use_extra_bufts(),
    )
    if start.mmap and not start_plan.inputs.mmap:
        dims = [(name, values) for name, values in dims if name != "mmap"]  # streaming from disk needs mmap
    gpu = start.gpu_expert_layers is not None
    quick = budget_s < QUICK_BUDGET_S
    sizes = {
        "n_prompt": 64 if quick else max(GPU_UBATCHES if gpu else CPU_UBATCHES),
        "n_gen": 8 if quick else 32,
        "reps": 1 if quick else 2,
    }
    progress(f"tuning {gguf.name} with {binary} for {budget_s:.0f} s ({', '.join(n for n, _ in dims)})")

    def params(settings: Settings) -> LoadParams:
        return plan_for(src, inputs, settings).load_params()

    def measure(settings: Settings, until: float) -> Measurement:
        planned = params(settings)  # planned first: the benchmark gets all the time that is left
        return run_bench(binary, gguf, planned, timeout=until - time.monotonic(), **sizes)

    def accept(candidate: Settings, current: Settings, until: float) -> bool:
        if candidate.kv_type == current.kv_type:
            return True
        progress(f"  checking {candidate.kv_type} cache output against {current.kv_type} (greedy, same text)")
        return same_output(gguf, params(current), params(candidate), deadline=until)

    result = search(start, dims, measure, deadline=deadline, accept=accept, progress=progress)
    key = tune_key(src, [t for t in start_plan.tiers if t.kind == "gpu"], inputs)
    report = {"start": result.start_measurement.to_dict(), "tuned": result.best_measurement.to_dict(), **sizes}
    path = cache.save(dsv4_home(), key, result.best, model=gguf.name, report=report) if key else None
    notes = _calibrate(src, result.best, deadline, progress)
    return TuneResult(gguf, result, path, time.monotonic() - began, budget_s, {"binary": str(binary), **sizes}, notes)


def _logical_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _calibrate(src: ModelSource, best: Settings, deadline: float, progress: Callable[[str], None]) -> list[str]:
    """Calibrate the speed model at the tuned thread count when it is not yet and time allows; else say how."""
    from dsv4cli.home import dsv4_home
    from dsv4cli.plan.calibrate import cache_key, calibration
    from dsv4cli.system import hardware
    from quant.recipes import DEFAULT_DENSE, DEFAULT_EXPERTS

    recipe = src.recipe or {"experts": DEFAULT_EXPERTS, "dense": DEFAULT_DENSE}
    key = cache_key(experts=recipe["experts"], dense=recipe["dense"], threads=best.threads)
    if key in hardware.read_machine_cache(dsv4_home()).get("calibration", {}):
        return []
    if time.monotonic() + CALIBRATE_S > deadline:
        return [f"the speed model is not calibrated at {best.threads} threads: run `dsv4 plan MODEL --calibrate`"]
    progress(f"calibrating the speed model at {best.threads} threads")
    calibration(dsv4_home(), experts=recipe["experts"], dense=recipe["dense"], threads=best.threads)
    return []
