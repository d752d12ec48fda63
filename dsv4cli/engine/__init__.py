"""Engines that run a model for `dsv4 chat`: the interface (`base`), the load parameters a plan produces
(`params`), the checks before any load (`preflight`) and the in-process llama-cpp-python engine (`inprocess`,
imported on use: it loads llama.cpp). A new engine is one module implementing `Engine`. `build` builds and finds
the llama-server binary that `dsv4 serve` runs (`dsv4 engine build`), from the same llama.cpp.
"""

from dsv4cli.engine.base import Engine, SampleOptions, TurnStats, TurnStream, stop
from dsv4cli.engine.params import LoadParams

__all__ = ["Engine", "LoadParams", "SampleOptions", "TurnStats", "TurnStream", "stop"]
