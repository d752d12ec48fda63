"""Read what a GGUF's header says without touching its data: the shards of a split file, the key/value fields and
the tensor list. `dsv4 plan` and `dsv4cli.gguf_check` both read GGUFs through here.

Split files follow llama.cpp's `gguf-split` naming (`NAME-00001-of-00003.gguf`, see `examples/gguf-split` in
llama.cpp): metadata is in the first shard, tensors are spread over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4cli.errors import PlanError

if TYPE_CHECKING:
    from quant.mapping import TensorSpec

# Keys `dsv4 quantize` writes besides the architecture (docs/formats.md §GGUF metadata).
RECIPE_KEYS = {"experts": "dsv4.experts", "dense": "dsv4.dense"}
SOURCE_KEY = "dsv4.source"


@dataclass(frozen=True)
class GgufHeader:
    """Every shard's fields (first shard wins, tokenizer arrays left out) and tensors, in file order."""

    files: tuple[Path, ...]
    fields: dict[str, Any]
    tensors: tuple[TensorSpec, ...]

    @property
    def recipe(self) -> dict[str, str] | None:
        """The recipe `dsv4 quantize` recorded, or None for a GGUF written by another tool."""
        return recipe_of(self.fields)


def recipe_of(fields: dict[str, Any]) -> dict[str, str] | None:
    """{"experts": ..., "dense": ...} from header fields, None unless both are recorded."""
    values = {name: fields.get(key) for name, key in RECIPE_KEYS.items()}
    return values if all(isinstance(v, str) for v in values.values()) else None


def split_shards(path: Path) -> list[Path]:
    """All shards of a split GGUF given its first shard (`name-00001-of-00003.gguf`); else just `path`.

    The set is checked by `quant.gguf_set.complete_split_set`: every shard present and of one conversion.
    """
    from quant.errors import OutputError
    from quant.gguf_set import complete_split_set

    try:
        return complete_split_set(path)
    except OutputError as e:
        raise PlanError(str(e), hint=e.hint) from e


def read_header(path: Path) -> GgufHeader:
    """Exact tensor shapes, types and bytes from the headers of every shard (the data is never read)."""
    import gguf

    from quant.mapping import TensorSpec

    tensors: list[TensorSpec] = []
    fields: dict[str, Any] = {}
    files = split_shards(path)
    for shard in files:
        try:
            reader = gguf.GGUFReader(shard)
        except (ValueError, OSError, IndexError) as e:
            raise PlanError(f"{shard}: not a GGUF file ({e})", hint="pass a .gguf written by `dsv4 quantize`") from e
        for key, f in reader.fields.items():
            if not key.startswith("tokenizer."):
                fields.setdefault(key, f.contents())
        for t in reader.tensors:
            tensors.append(TensorSpec(t.name, tuple(int(n) for n in t.shape), int(t.tensor_type), int(t.n_bytes)))
    return GgufHeader(tuple(files), fields, tuple(tensors))


def read_recipe(path: Path) -> dict[str, str] | None:
    """The recipe recorded in a GGUF's first shard, None when it has none or cannot be read."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError):
        return None
    fields = {key: f.contents() for key in RECIPE_KEYS.values() if (f := reader.get_field(key)) is not None}
    return recipe_of(fields)
