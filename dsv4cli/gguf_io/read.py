"""Read what a GGUF's header says without touching its data: the shards of a split file, the key/value fields and
the tensor list. `dsv4 plan`, the chat preflight (`dsv4cli.gguf_io.check`) and the local model lookup all read GGUFs
through here, and this reads them through the one bounded parser, `quant.gguf_header`.

Split files follow llama.cpp's `gguf-split` naming (`NAME-00001-of-00003.gguf`, see `examples/gguf-split` in
llama.cpp): metadata is in the first shard, tensors are spread over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4cli.errors import PlanError
from quant.errors import QuantError
from quant.gguf_keys import FILE_TYPE, MIX_KEY, RECIPE_KEYS

if TYPE_CHECKING:
    from quant.mapping import TensorSpec

TOKENIZER_PREFIX = "tokenizer."
HINT = "the GGUF is damaged or not DeepSeek V4; download it again or re-create it with `dsv4 quantize`"


@dataclass(frozen=True)
class GgufHeader:
    """Every shard's fields (first shard wins; tokenizer arrays only when asked for) and tensors, in file order."""

    files: tuple[Path, ...]
    fields: dict[str, Any]
    tensors: tuple[TensorSpec, ...]

    @property
    def recipe(self) -> dict[str, str] | None:
        """The recipe `dsv4 quantize` recorded, or None for a GGUF written by another tool."""
        return recipe_of(self.fields)


def recipe_of(fields: dict[str, Any]) -> dict[str, str] | None:
    """{"experts": ..., "dense": ...} from header fields, with "fit": "mix" for a fitted quant (`quantize --size`:
    the two names are only its base, so it is never taken for that recipe's file); None unless both are recorded
    and general.file_type is the one dsv4 writes for them: llama-quantize copies its input's dsv4.* keys into the
    quant it writes but sets its own file type, and its Q2_K is not dsv4's lossless recipe."""
    from quant.recipes import RECIPES

    values = {name: fields.get(key) for name, key in RECIPE_KEYS.items()}
    if not all(isinstance(v, str) for v in values.values()):
        return None
    recipe = RECIPES.get(values["experts"])
    if recipe is None or fields.get(FILE_TYPE) != recipe.ftype:
        return None
    return {**values, "fit": "mix"} if MIX_KEY in fields else values


def recipe_label(recipe: dict[str, str]) -> str:
    """How a recipe is shown: "mxfp4/q8_0", or "fitted mix"."""
    return "fitted mix" if recipe.get("fit") else f"{recipe['experts']}/{recipe['dense']}"


def read_header(path: Path, *, tokenizer: bool = False) -> GgufHeader:
    """Exact tensor shapes, types and bytes from the headers of every shard (the data is never read), after
    checking the split set (every shard present and of one conversion, `quant.gguf_set`).

    Raises PlanError naming the shard for a missing, damaged or oversized header.
    """
    from quant.gguf_set import read_split_set

    def keep(key: str) -> bool:
        return tokenizer or not key.startswith(TOKENIZER_PREFIX)

    try:
        shards = read_split_set(path, keep=keep)
    except QuantError as e:
        raise PlanError(str(e), hint=e.hint) from e
    fields: dict[str, Any] = {}
    for header in shards.values():
        for key, value in header.fields.items():
            fields.setdefault(key, value)
    tensors = tuple(t for header in shards.values() for t in header.tensors)
    return GgufHeader(tuple(shards), fields, tensors)


def read_recipe(path: Path) -> dict[str, str] | None:
    """The recipe recorded in a GGUF's first shard, None when it has none or cannot be read."""
    from quant.gguf_header import read_gguf_header

    try:
        header = read_gguf_header(path, keep=lambda key: key in RECIPE_KEYS.values() or key in (FILE_TYPE, MIX_KEY))
    except QuantError:
        return None
    return recipe_of(header.fields)


def check_facts(facts: dict[str, Any], keys: dict[str, str], path: Path) -> None:
    """Architecture facts read from a GGUF (under their config.json names; `keys` maps them back to GGUF keys for
    messages) within the bounds a config.json gets (`quant.config.INTS`), before any of them sizes a plan.

    Raises PlanError naming the file and the GGUF key.
    """
    from quant.config import INT_LISTS, INTS
    from quant.files import shown

    def bad(name: str, what: str) -> PlanError:
        key = keys.get(name, name)
        return PlanError(f"{path}: {key} must be {what}, got {shown(facts[name], 60)}", hint=HINT)

    for name, value in facts.items():
        if name in INTS:
            low, high = INTS[name]
            if type(value) is not int or not low <= value <= high:
                raise bad(name, f"an integer in [{low}, {high}]")
        elif name in INT_LISTS:
            ok = isinstance(value, list) and len(value) <= (1 << 10)
            if not ok or not all(type(v) is int and 0 <= v < (1 << 16) for v in value):
                raise bad(name, "a list of small non-negative integers")
    if facts.get("num_experts_per_tok", 0) > facts.get("n_routed_experts", 1 << 30):
        raise bad("num_experts_per_tok", "at most the expert count")
    if len(facts.get("compress_ratios", [])) < facts.get("num_hidden_layers", 0):
        raise bad("compress_ratios", "an array with an entry per layer")
