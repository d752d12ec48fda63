"""The quantization recipes, registered once: each is a GGML type with everything the converter, the planner and
the command line need to know about it.

A GGUF's recipe is two names: `experts` for the routed-expert weights (the bulk of the model, read k/E per token)
and `dense` for the FP8 dense projections. Adding a type is one `Recipe` in `RECIPES`: the `--experts`/`--dense`
choices, their validation, the tensor plan (`quant.mapping`: type, fallback, `general.file_type`), the quantizers
(`quant.quantizers`, `quant.experts`), the planner's recipe comparison (`dsv4cli.plan.verdict`) and `dsv4 show`
all read this table, and `tests/test_recipes.py` converts and loads every entry.

Plain data only (GGML type ids from ggml.h, block sizes from ggml-common.h): `dsv4 --help` imports this module,
and numpy, gguf and llama_cpp are too slow to import for that.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.errors import UnsupportedError

EXPERTS, DENSE = "experts", "dense"


@dataclass(frozen=True)
class Recipe:
    """One GGML type dsv4 writes, and how.

    `roles`: which flags offer it (`--experts`, `--dense`). `fallback`: the recipe used for a tensor whose rows are
    not a multiple of `block` (only tiny models hit this). `quantizer`: "ggml" is `ggml_quantize_chunk` from the
    libggml-base llama-cpp-python bundles, "gguf" the gguf package's numpy code. `expert_search`: how a routed
    expert is encoded ("scale": a per-block scale search, MXFP4 and Q4_0 only; "imatrix": ggml's quantizer, per
    row the better of plain and weighted by the expert's own x²; "plain": the quantizer as is; with an importance
    matrix every ggml type is weighted by it instead, `quant.experts`). `fp4_repack`: FP4 checkpoints repack into it
    losslessly. `ftype`: the `llama_ftype` written as `general.file_type` when it is the expert recipe (llama.h;
    the _M variant where llama.h names mixes). `needs_imatrix`: the i-quants, whose codebooks are searched under
    activation importance; dsv4 refuses them without an importance matrix (`dsv4 imatrix`), as llama-quantize does.
    """

    name: str
    ggml_type: int
    block: int  # values per block
    block_bytes: int
    roles: tuple[str, ...]
    fallback: str | None = None
    quantizer: str = "ggml"
    expert_search: str = "plain"
    fp4_repack: bool = False
    ftype: int | None = None
    needs_imatrix: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("q8_0", 8, 32, 34, (DENSE,), fallback="bf16"),
        Recipe("mxfp4", 39, 32, 17, (EXPERTS,), fallback="q8_0", expert_search="scale", fp4_repack=True, ftype=38),
        Recipe("q4_0", 2, 32, 18, (EXPERTS,), fallback="q8_0", expert_search="scale", ftype=2),
        Recipe("q4_k", 12, 256, 144, (EXPERTS, DENSE), fallback="q8_0", expert_search="imatrix", ftype=15),  # Q4_K_M
        Recipe("bf16", 30, 1, 2, (DENSE,), quantizer="gguf"),
        Recipe("q6_k", 14, 256, 210, (EXPERTS, DENSE), fallback="q8_0", expert_search="imatrix", ftype=18),
        Recipe("q2_k", 10, 256, 84, (EXPERTS, DENSE), fallback="q8_0", expert_search="imatrix", ftype=10),
        Recipe("q3_k", 11, 256, 110, (EXPERTS, DENSE), fallback="q8_0", expert_search="imatrix", ftype=12),  # Q3_K_M
        Recipe("q5_k", 13, 256, 176, (EXPERTS, DENSE), fallback="q8_0", expert_search="imatrix", ftype=17),  # Q5_K_M
        *(
            Recipe(name, ggml_type, 256, size, (EXPERTS, DENSE), fallback="q8_0", ftype=ftype, needs_imatrix=True)
            for name, ggml_type, size, ftype in (
                ("iq2_xxs", 16, 66, 19),
                ("iq2_xs", 17, 74, 20),
                ("iq2_s", 22, 82, 28),
                ("iq3_xxs", 18, 98, 23),
                ("iq3_s", 21, 110, 26),
                ("iq4_xs", 23, 136, 30),
            )
        ),
    )
}
BY_TYPE: dict[int, Recipe] = {r.ggml_type: r for r in RECIPES.values()}
EXPERT_RECIPES = {r.name: r.ggml_type for r in RECIPES.values() if EXPERTS in r.roles}
DENSE_RECIPES = {r.name: r.ggml_type for r in RECIPES.values() if DENSE in r.roles}
DEFAULT_EXPERTS = "mxfp4"  # lossless for the FP4 releases (a repack, no rounding)
DEFAULT_DENSE = "q8_0"


def check_recipe(experts: str, dense: str) -> None:
    """Raise UnsupportedError naming the flag and its choices for an unknown recipe name."""
    if experts not in EXPERT_RECIPES:
        raise UnsupportedError(f"--experts {experts!r}: choose one of {', '.join(EXPERT_RECIPES)}")
    if dense not in DENSE_RECIPES:
        raise UnsupportedError(f"--dense {dense!r}: choose one of {', '.join(DENSE_RECIPES)}")


def fallback_type(ggml_type: int) -> int | None:
    """The GGML type used instead of `ggml_type` when a row does not fit its block; None when nothing is."""
    recipe = BY_TYPE.get(ggml_type)
    return RECIPES[recipe.fallback].ggml_type if recipe and recipe.fallback else None


def type_name(ggml_type: int) -> str:
    """The GGML name of a type id ("Q8_0"): the registry's types without importing gguf, others through it."""
    if ggml_type in BY_TYPE:
        return BY_TYPE[ggml_type].name.upper()
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return str(ggml_type)
