"""What a plan is asked for: budgets, recipe, context and the machine figures given on the command line, typed.

`dsv4 plan` builds it from its flags, `dsv4cli.load.placement.Placement.plan_inputs` from chat's and serve's.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4cli.rpc.protocol import Endpoint
from quant.recipes import DEFAULT_DENSE, DEFAULT_EXPERTS

DEFAULT_CTX = 32768
DEFAULT_UBATCH = 512
DEFAULT_MARGIN_GIB = 1.0


@dataclass(frozen=True)
class PlanInputs:
    """Budgets and options; None means detect (VRAM) or use what is available (RAM) or the default bandwidth."""

    vram_gib: tuple[float, ...] | None = None
    ram_gib: float | None = None
    no_disk: bool = False
    ctx: int | None = None  # None: DEFAULT_CTX capped at the model's context length
    ubatch: int | None = None  # None: tuned, else DEFAULT_UBATCH (dsv4cli.plan.tuning, like the settings below)
    kv_type: str | None = None  # None: tuned, else DEFAULT_KV_TYPE
    margin_gib: float = DEFAULT_MARGIN_GIB
    experts: str = DEFAULT_EXPERTS
    dense: str = DEFAULT_DENSE
    ram_bw: float | None = None
    vram_bw: float | None = None
    disk_bw: float | None = None
    pcie_bw: float | None = None
    measure: bool = False  # measure RAM and disk bandwidth again
    threads: int | None = None  # None: physical cores
    rpc_bw: float | None = None  # RPC workers' memory GB/s (None: the host RAM default)
    rpc: tuple[Endpoint, ...] = ()  # llama.cpp RPC workers, probed for memory and network at plan time
    calibrate: bool = False  # time llama.cpp's kernels here again (dsv4cli.plan.calibrate)
    cpu_gbs: float | None = None  # GEMV GB/s per thread, given (another machine): no calibration
    reserve_gib: float | None = None  # host RAM kept for the OS; None: max(2 GiB, 10 % of RAM)
    flash_attn: bool | None = None  # None: tuned, else on
    repack: bool | None = None  # weight repacking; None: tuned, else llama_lib.use_extra_bufts()
    mmap: bool | None = None  # memory-map even when everything fits; None: tuned, else only when streaming
    gpu_expert_layers: int | None = None  # at most this many layers' experts in VRAM; None: tuned, else all that fit
    untuned: bool = False  # ignore `dsv4 tune`'s cached result (`--untuned`)
