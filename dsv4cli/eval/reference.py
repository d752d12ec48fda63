"""Which model an evaluation compares against, and whether the two can be compared at all.

Without `--ref`, the reference is the best dsv4 can do from the same weights:
* a `dsv4 quantize` conversion: the lossless conversion of the same checkpoint (MXFP4 experts, a repack of the
  FP4 release's own values, and BF16 dense, exact for its FP8 and BF16 tensors), found beside the model or in
  `$DSV4_HOME/gguf` by the source and recipe in its header, or made now with dsv4's own quantizer;
* a quant pulled from a GGUF repo: the largest other quant of that repo on disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.errors import UsageError
from dsv4cli.gguf_io.read import read_header, recipe_of
from dsv4cli.units import human_bytes
from quant.gguf_keys import ARCHITECTURE, MERGES, SOURCE_KEY, TOKENIZER_MODEL, TOKENIZER_PRE, TOKENS

LOSSLESS = {"experts": "mxfp4", "dense": "bf16"}  # for FP4 releases; FP8 experts have no lossless dsv4 recipe
TOKENIZER_KEYS = (TOKENIZER_MODEL, TOKENIZER_PRE, TOKENS, MERGES)


@dataclass(frozen=True)
class Reference:
    gguf: Path
    name: str  # how the result names it
    why: str  # one sentence for the user: what it is and how it was chosen


@dataclass(frozen=True)
class Vocabulary:
    """What must match for two models' distributions to be compared token by token."""

    arch: str
    n_vocab: int
    tokenizer_sha256: str


def vocabulary(gguf: Path) -> Vocabulary:
    fields = read_header(gguf, tokenizer=True).fields
    h = hashlib.sha256()
    for key in TOKENIZER_KEYS:
        h.update(f"{key}={fields.get(key)!r}\0".encode())
    return Vocabulary(str(fields.get(ARCHITECTURE)), len(fields.get(TOKENS) or ()), h.hexdigest())


def check_comparable(model: Path, ref: Path) -> Vocabulary:
    """The shared vocabulary, or a UsageError naming what differs (before any work)."""
    a, b = vocabulary(model), vocabulary(ref)
    hint = "pass a --ref of the same model family (same architecture and tokenizer)"
    if a.arch != b.arch:
        raise UsageError(f"cannot compare {model.name} ({a.arch}) with reference {ref.name} ({b.arch})", hint=hint)
    if a.n_vocab != b.n_vocab:
        raise UsageError(
            f"cannot compare {model.name} ({a.n_vocab:,} tokens) with reference {ref.name} ({b.n_vocab:,} tokens): "
            "the vocabularies differ",
            hint=hint,
        )
    if a.tokenizer_sha256 != b.tokenizer_sha256:
        raise UsageError(f"cannot compare {model.name} with reference {ref.name}: the tokenizers differ", hint=hint)
    return a


def is_lossless(fields: dict) -> bool:
    """dsv4's lossless conversion as dsv4 wrote it (`recipe_of` checks the file type too: a llama-quantize Q2_K made
    from the lossless file carries its dsv4.* keys, and must not be taken as its own reference, KLD 0)."""
    return recipe_of(fields) == LOSSLESS


def default_reference(model: Path, *, note: Callable[[str], None]) -> Reference:
    """The reference for `model` when no `--ref` is given (see the module docstring); UsageError when there is
    none, saying what to pass."""
    from dsv4cli.home import models_dir

    fields = read_header(model).fields
    if models_dir().resolve() in model.resolve().parents:
        return _other_quant(model)
    source = fields.get(SOURCE_KEY)
    if not isinstance(source, str):
        raise UsageError(
            f"{model} records no checkpoint it was converted from, so dsv4 cannot make its lossless reference",
            hint="pass --ref with a higher-precision GGUF of the same model",
        )
    return _lossless(model, _checkpoint_folder(model, source), note=note)


def _checkpoint_folder(model: Path, name: str) -> Path:
    """The checkpoint a conversion came from: the header records its folder name, the report beside the file
    (`dsv4 quantize`'s) its path; a pulled model's folder in the dsv4 home, or one beside the file, by name."""
    import json

    from dsv4cli.home import models_dir
    from dsv4cli.hub.gguf_repo import set_name
    from dsv4cli.models.inventory import REPORT_SUFFIX

    try:
        reported = json.loads((model.parent / (set_name(model.name) + REPORT_SUFFIX)).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        reported = None
    candidates = [Path(reported)] if isinstance(reported, str) else []
    candidates += [models_dir() / name, model.parent / name]
    return next((c for c in candidates if c.name == name and (c / "config.json").is_file()), candidates[0])


def _lossless(model: Path, folder: Path, *, note: Callable[[str], None]) -> Reference:
    from dsv4cli.home import gguf_dir
    from dsv4cli.models.quantize import quantize
    from dsv4cli.models.ref import ModelRef
    from quant.config import facts_of
    from quant.convert import QuantOptions
    from quant.errors import QuantError
    from quant.files import load_json_object

    what = f"the lossless conversion of {folder.name} (MXFP4 experts, BF16 dense)"
    if is_lossless(read_header(model).fields):
        return Reference(model, model.name, f"{what} is the model itself: KLD is 0 by construction")
    try:
        facts = facts_of(load_json_object(folder / "config.json"))
    except (OSError, ValueError, QuantError) as e:
        raise UsageError(
            f"{model} was converted from {folder}, which is not there any more: cannot make its lossless reference",
            hint=f"pull the checkpoint again, or pass --ref ({e})",
        ) from e
    if facts["expert_dtype"] != "fp4":
        raise UsageError(
            f"{folder.name} stores its experts in FP8: dsv4 has no lossless expert recipe for it",
            hint="pass --ref with the highest-precision GGUF of it you have",
        )
    for candidate in _converted_ggufs(model.parent, gguf_dir()):
        found = read_header(candidate).fields
        if found.get(SOURCE_KEY) == folder.name and is_lossless(found):
            return Reference(candidate, candidate.name, f"{what}: {candidate}")
    out = model.parent / f"{folder.name}-{LOSSLESS['experts']}-{LOSSLESS['dense']}.gguf"
    note(f"making the reference: {what} -> {out}")
    options = QuantOptions(experts=LOSSLESS["experts"], dense=LOSSLESS["dense"])
    report = quantize(ModelRef(str(folder), "checkpoint", path=folder), output=out, options=options)
    made = Path(report.outputs[0])
    return Reference(made, made.name, f"{what}, made now: {made}")


def _converted_ggufs(*folders: Path) -> list[Path]:
    found: list[Path] = []
    for folder in dict.fromkeys(folders):
        if folder.is_dir():
            found += [p for p in sorted(folder.glob("*.gguf")) if "-of-" not in p.name or "-00001-of-" in p.name]
    return found


def _other_quant(model: Path) -> Reference:
    from dsv4cli.models.inventory import list_local

    entries = [m for m in list_local() if m.kind == "gguf-repo" and m.state == "complete"]
    mine = next((m for m in entries if m.path.resolve() == model.resolve()), None)
    if mine is None:
        raise UsageError(f"{model} is not a complete pulled quant", hint="pass --ref with the GGUF to compare against")
    larger = [m for m in entries if m.folder == mine.folder and m.bytes > mine.bytes]
    if not larger:
        raise UsageError(
            f"no larger quant of {mine.repo} is downloaded to compare {mine.name} against",
            hint=f"pull one (e.g. `dsv4 pull {mine.repo}:Q8_0`) or pass --ref",
        )
    best = max(larger, key=lambda m: m.bytes)
    why = f"{best.name}, the largest quant of {mine.repo} on disk ({human_bytes(best.bytes)})"
    return Reference(best.path, best.name, why)
