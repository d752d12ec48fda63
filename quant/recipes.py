"""The quantization recipes, declared once: which GGML type each recipe name writes, and the defaults.

A recipe is two names: `experts` for the routed-expert weights (the bulk of the model, read k/E per token) and
`dense` for the FP8 dense projections. Adding a recipe is one entry here; the CLI choices, validation, the
converter and the planner all read these tables.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as T

from quant.errors import UnsupportedError

EXPERT_RECIPES = {"mxfp4": T.MXFP4, "q4_0": T.Q4_0, "q4_k": T.Q4_K}
DENSE_RECIPES = {"q8_0": T.Q8_0, "q4_k": T.Q4_K, "bf16": T.BF16}
DEFAULT_EXPERTS = "mxfp4"  # lossless for the FP4 releases (a repack, no rounding)
DEFAULT_DENSE = "q8_0"


def check_recipe(experts: str, dense: str) -> None:
    """Raise UnsupportedError naming the flag and its choices for an unknown recipe name."""
    if experts not in EXPERT_RECIPES:
        raise UnsupportedError(f"--experts {experts!r}: choose one of {', '.join(EXPERT_RECIPES)}")
    if dense not in DENSE_RECIPES:
        raise UnsupportedError(f"--dense {dense!r}: choose one of {', '.join(DENSE_RECIPES)}")
