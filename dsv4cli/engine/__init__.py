"""Engines that run a model: the interface (`base`), the load parameters a plan produces (`params`), the checks
before any load (`preflight`), the KV-cache sizes (`kvcache`), the in-process llama-cpp-python engine
(`inprocess`, imported on use: it loads llama.cpp), the llama-server engine (`llama_server`) and scoring with
the engine build's `llama-perplexity` (`scoring`). A new engine is one module implementing `Engine` and one entry
in `dsv4cli.load.engines`. The binaries themselves are built and found by `dsv4cli.toolchain`.
"""

from dsv4cli.engine.base import Engine, SampleOptions, TurnStats, TurnStream, stop
from dsv4cli.engine.params import LoadParams

__all__ = ["Engine", "LoadParams", "SampleOptions", "TurnStats", "TurnStream", "stop"]
