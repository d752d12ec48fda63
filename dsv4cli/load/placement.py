"""Where the command line puts a model (`--plan FILE`, or `--vram/--ram/--ctx/--cpu/--rpc`), as one typed value
that `chat`, `serve` and `eval` pass down unchanged; `dsv4cli.load.prepared.load_params` turns it into the
llama.cpp load parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsv4cli.plan.inputs import PlanInputs
    from dsv4cli.rpc.protocol import Endpoint


@dataclass(frozen=True)
class Placement:
    """Where `--plan` or `--vram/--ram/--ctx` put the model; all None means plan for this machine."""

    plan_file: Path | None = None
    vram_gib: tuple[float, ...] | None = None
    ram_gib: float | None = None
    ctx: int | None = None
    cpu: bool = False  # no GPU even where one is found (`--cpu`)
    rpc: tuple[Endpoint, ...] = ()  # llama.cpp RPC workers (`--rpc`; the in-process engine refuses them)
    untuned: bool = False  # ignore `dsv4 tune`'s cached settings (`--untuned`)

    def plan_inputs(self) -> PlanInputs:
        """The budgets as plan inputs, for a plan made now (no `--plan` file)."""
        from dsv4cli.plan.inputs import PlanInputs

        vram = () if self.cpu else self.vram_gib
        return PlanInputs(vram_gib=vram, ram_gib=self.ram_gib, ctx=self.ctx, rpc=self.rpc, untuned=self.untuned)
