"""Which local GGUF a MODEL means: the one rule every command (`chat`, `serve`, `plan`, `show`, `rm`, `eval`) uses.

* a GGUF path: that file;
* `org/name/file.gguf`: that file (and its split set) as `dsv4 pull` verified it into the repo's folder;
* `NAME:TAG`, or an ad-hoc GGUF repo `org/name`: the pulled quant the tag selects (`dsv4cli.hub.gguf_repo`);
* a registry name: its quantized GGUF under `$DSV4_HOME/gguf` with the asked recipe, told apart by the recipe in
  the header; with no recipe asked, the default recipe, then any quantized GGUF of it, then a pulled quant of one
  of its `gguf_repos`.

`resolve_gguf` adds what a command that loads needs: the built-in tiny model when MODEL is left out, the V4.1
refusal, the one-line errors that say what to pull, and a pull and quantize of a built-in model on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dsv4cli.errors import RuntimeLoadError
from dsv4cli.models.ref import ModelRef, RefKind, resolve_model

DEFAULT_MODEL = "tiny"
TINY_NOTE = (
    "note: no model given, using the built-in tiny model: random weights, for testing only; for a real one run "
    "`dsv4 pull deepseek-v4-flash && dsv4 quantize deepseek-v4-flash`"
)


def is_prequantized(ref: ModelRef) -> bool:
    """A reference to a published GGUF (a tag, one file, or a GGUF repo given by id) rather than a checkpoint."""
    spec = ref.spec
    return spec is not None and bool(ref.tag or ref.file or (spec.repo and not spec.config and not spec.builtin))


def find_local_gguf(ref: ModelRef, recipe: tuple[str, str] | None = None) -> Path | None:
    """The first shard of the local GGUF `ref` means (see the module docstring), or None when there is none.

    `recipe` (experts, dense) asks for exactly that conversion of a registry model, as `dsv4 plan` does.
    """
    from dsv4cli.hub.gguf_repo import find_local
    from dsv4cli.models.local import find_gguf, local_ggufs
    from quant.recipes import DEFAULT_DENSE, DEFAULT_EXPERTS

    if ref.kind in (RefKind.GGUF, RefKind.CHECKPOINT):
        return ref.path
    spec = ref.spec
    if is_prequantized(ref):
        return find_local(spec, ref.tag, file=ref.file)
    if recipe is not None:
        return find_gguf(spec, experts=recipe[0], dense=recipe[1])
    found = find_gguf(spec, experts=DEFAULT_EXPERTS, dense=DEFAULT_DENSE) or next(iter(local_ggufs(spec)), None)
    return found or find_local(spec, None)


def resolve_gguf(ref: ModelRef | None, *, note: Callable[[str], None]) -> Path:
    """The GGUF to load: `find_local_gguf`, the built-in tiny model when MODEL is None, or one-line errors.

    A folder given as MODEL is returned as it is: the header check then names it.
    """
    from dsv4cli.engine.preflight import require_runnable

    if ref is None:
        note(TINY_NOTE)
        ref = resolve_model(DEFAULT_MODEL)
    if ref.kind in (RefKind.GGUF, RefKind.CHECKPOINT):
        return ref.path
    spec = ref.spec
    if ref.tag or ref.file:  # a pulled pre-quantized GGUF (its header is checked before loading)
        pulled = find_local_gguf(ref)
        if pulled is None:
            raise RuntimeLoadError(
                f"{ref.text} is not downloaded (no complete pull of it in the dsv4 home)",
                hint=f"run `dsv4 pull {ref.text}` (`dsv4 plan {ref.text}` first says if it fits)",
            )
        return pulled
    require_runnable(spec.arch, spec.name)
    found = find_local_gguf(ref)
    if found:
        return found
    if not spec.builtin:
        raise RuntimeLoadError(
            f"no GGUF of {spec.name} in the dsv4 home",
            hint=f"run `dsv4 pull {spec.name}` (a checkpoint then needs `dsv4 quantize {spec.name}`)",
        )
    return _prepare_builtin(ref, note=note)


def _prepare_builtin(ref: ModelRef, *, note: Callable[[str], None]) -> Path:
    """Pull (write) and quantize a built-in test model on first use: it takes seconds and needs no network."""
    from dsv4cli.hub.pull import PullOptions, pull
    from dsv4cli.models.quantize import quantize
    from quant.convert import QuantOptions

    pull(ref.spec.name, PullOptions())
    note(f"quantizing {ref.spec.name} (first use)")
    return Path(quantize(ref, output=None, options=QuantOptions()).outputs[0])
