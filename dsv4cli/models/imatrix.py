"""`dsv4 imatrix` work: resolve MODEL to its lossless GGUF, run calibration text through it, cache the result.

The matrix is cached under `$DSV4_HOME/imatrix/`, keyed by the GGUF's name and a hash of the text, so `dsv4
quantize --imatrix NAME` and `--size` find it again. Coverage (tokens per routed expert) is part of the result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.errors import UsageError
from dsv4cli.home import dsv4_home
from dsv4cli.models.ref import ModelRef, resolve_model
from quant.imatrix import Imatrix, load_imatrix, save_imatrix
from quant.outlock import output_lock
from quant.recipes import DEFAULT_DENSE, DEFAULT_EXPERTS

CHUNK = 256  # tokens per calibration chunk (the KV cache is cleared between chunks)


def imatrix_dir() -> Path:
    """Importance matrices made by `dsv4 imatrix`."""
    return dsv4_home() / "imatrix"


@dataclass(frozen=True)
class LayerCoverage:
    """Tokens that reached the routed experts of one layer: fewest, most, and the experts below the floor."""

    layer: int
    experts: int
    fewest: int
    most: int
    below_floor: list[int]


def lossless_gguf(ref: ModelRef) -> Path:
    """The GGUF the statistics come from: a GGUF given as MODEL, or the model's lossless conversion."""
    if ref.kind == "gguf":
        if ref.path is None or not ref.path.is_file():
            raise UsageError(f"{ref.text}: no such GGUF")
        return ref.path
    if ref.kind == "checkpoint" or ref.spec is None:
        raise UsageError(
            f"{ref.text} is a checkpoint folder",
            hint=f"convert it first (`dsv4 quantize {ref.text}`), then pass the GGUF",
        )
    from dsv4cli.models.local import find_gguf

    found = find_gguf(ref.spec, experts=DEFAULT_EXPERTS, dense=DEFAULT_DENSE)
    if found is None:
        raise UsageError(
            f"model '{ref.spec.name}' has no lossless GGUF ({DEFAULT_EXPERTS}/{DEFAULT_DENSE})",
            hint=f"run `dsv4 quantize {ref.spec.name}` first",
        )
    return found


def cache_path(gguf: Path, text: str) -> Path:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    stem = gguf.name.removesuffix(".gguf")
    return imatrix_dir() / f"{stem}-{digest}.imatrix.gguf"


def read_text(path: Path | None) -> tuple[str, str]:
    """(calibration text, its name): `--text FILE` or the built-in text."""
    if path is None:
        from dsv4cli.models.calibration import TEXT

        return TEXT, "dsv4 built-in calibration text"
    try:
        return path.read_text(encoding="utf-8"), path.name
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--text {path}: cannot read it as UTF-8 text ({e})") from e


def make_imatrix(
    model: str, *, text_file: Path | None = None, chunk: int = CHUNK, max_chunks: int = 0, force: bool = False
) -> tuple[Path, Imatrix, bool]:
    """(cache file, importance matrix, whether it was already cached) for MODEL and the calibration text."""
    gguf = lossless_gguf(resolve_model(model))
    text, dataset = read_text(text_file)
    if not text.strip():
        raise UsageError(f"--text {text_file}: the file is empty")
    path = cache_path(gguf, text)
    if path.is_file() and not force:
        return path, load_imatrix(path), True
    path.parent.mkdir(parents=True, exist_ok=True)
    from dsv4cli.engine.activations import collect

    with output_lock(path):
        imatrix = collect(gguf, text, chunk=chunk, max_chunks=max_chunks, imatrix=Imatrix(dataset=dataset))
        imatrix.model = gguf.name
        save_imatrix(imatrix, path)
    return path, imatrix, False


def resolve_imatrix(text: str) -> Path:
    """`--imatrix`: a file, or the name of one under $DSV4_HOME/imatrix (as `dsv4 imatrix` printed it)."""
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    cached = imatrix_dir() / text
    if cached.is_file():
        return cached
    raise UsageError(f"--imatrix {text}: no such file", hint="make one with `dsv4 imatrix MODEL`")


def expert_coverage(imatrix: Imatrix) -> list[LayerCoverage]:
    """Per layer, the tokens that reached each routed expert (from its gate projection's counts)."""
    rows = []
    for name, counts in imatrix.counts.items():
        parts = name.split(".")
        if len(parts) > 2 and parts[2] == "ffn_gate_exps":
            rows.append(
                LayerCoverage(
                    int(parts[1]), len(counts), int(counts.min()), int(counts.max()), imatrix.below_floor(name)
                )
            )
    return sorted(rows, key=lambda r: r.layer)
