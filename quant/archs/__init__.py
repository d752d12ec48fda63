"""The model families dsv4 knows, one module each, registered here by their GGUF `general.architecture` name.

Adding a family is one module (an `Arch`, see `quant.archs.base`) and its line in `ARCHS`; the converter, the
planner, the header check, the registry and the preflight read these descriptors.
"""

from __future__ import annotations

from quant.archs import deepseek4, deepseek41
from quant.archs.base import Arch

ARCHS: dict[str, Arch] = {a.name: a for a in (deepseek4.ARCH, deepseek41.ARCH)}
V4 = deepseek4.ARCH.name  # the family the bundled llama.cpp runs, and the registry's default
