"""`dsv4 tune`: measure the fastest load settings for a model on this machine (used by plan, chat and serve)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated

import typer

from dsv4cli.cli.options import CpuOpt, CtxOpt, JsonOpt, RamOpt, VramOpt, placement
from dsv4cli.errors import UsageError
from dsv4cli.ui import err, out, print_json

if TYPE_CHECKING:
    from dsv4cli.tune.run import TuneResult

TUNE_EXAMPLES = """\b
Examples:
  dsv4 tune deepseek-v4-flash                 # five minutes of llama-bench; plan, chat and serve use the result
  dsv4 tune deepseek-v4-flash --vram 24 --budget 10m
  dsv4 plan deepseek-v4-flash --untuned       # the default rules instead"""
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
MAX_BUDGET_S = 24 * 3600


def parse_budget(value: str) -> float:
    """'5m' -> 300.0; '90s', '90', '1.5h' likewise."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", value)
    seconds = float(found.group(1)) * _UNITS[found.group(2)] if found else -1.0
    if not 0 < seconds <= MAX_BUDGET_S:
        raise UsageError(f"--budget {value!r}: expected a duration such as 90s, 5m or 1h (at most 24h)")
    return seconds


def _check_budget(value: str) -> str:
    parse_budget(value)
    return value


def register(app: typer.Typer) -> None:
    @app.command(epilog=TUNE_EXAMPLES)
    def tune(
        model: Annotated[
            str | None,
            typer.Argument(help="GGUF path, registry name or GGUF repo `org/name:TAG`; default: the tiny test model."),
        ] = None,
        vram: VramOpt = None,
        ram: RamOpt = None,
        cpu: CpuOpt = False,
        ctx: CtxOpt = None,
        budget: Annotated[
            str, typer.Option("--budget", callback=_check_budget, help="Time to spend measuring, e.g. 90s, 5m, 1h.")
        ] = "5m",
        json_output: JsonOpt = False,
    ) -> None:
        """Measure decode and prefill speed for the settings that matter here; plan, chat and serve use the best."""
        from dsv4cli.models.ref import resolve_model
        from dsv4cli.tune.run import tune_model

        where = placement(None, vram, ram, ctx, cpu)
        result = tune_model(
            model and resolve_model(model),
            where,
            budget_s=parse_budget(budget),
            progress=lambda line: err.print(line, markup=False, highlight=False),
        )
        if json_output:
            print_json(result.to_dict())
        else:
            _render(result)


def _render(result: TuneResult) -> None:
    s = result.search
    tg, pp = s.speedup
    start, best = s.start_measurement, s.best_measurement
    out.print(f"default: {s.start.label()}", markup=False)
    out.print(f"  decode {start.tg_tps:.2f} tok/s, prefill {start.pp_tps:.1f} tok/s", markup=False)
    out.print(f"tuned:   {s.best.label()}", markup=False)
    out.print(
        f"  decode {best.tg_tps:.2f} tok/s ({tg:.2f}x), prefill {best.pp_tps:.1f} tok/s ({pp:.2f}x); "
        f"noise ±{s.noise * 100:.0f} %",
        markup=False,
    )
    stopped = "budget spent before every setting was tried" if s.stopped == "budget" else "every setting tried"
    out.print(f"{len(s.trials)} runs in {result.seconds:.0f} s of {result.budget_s:.0f} s ({stopped})", markup=False)
    for note in result.notes:
        err.print(f"note: {note}", markup=False)
    if result.cache_file:
        out.print(f"saved to {result.cache_file}; `dsv4 plan/chat/serve` use it (`--untuned` ignores it)", markup=False)
