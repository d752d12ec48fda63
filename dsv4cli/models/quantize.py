"""`dsv4 quantize` work: resolve MODEL to a complete checkpoint folder, pick the output, check disk, convert.

The conversion itself is quant.convert; this module adds what needs the registry and $DSV4_HOME: registry names,
default output names, refusing to overwrite, and the free-disk check (done before anything is written), all under
the output's lock so that a second run on the same output stops at once instead of racing the first.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from dsv4cli.errors import DiskSpaceError, UsageError
from dsv4cli.models.local import checkpoint_state, default_gguf_path
from dsv4cli.models.ref import ModelRef, resolve_model
from dsv4cli.units import human_bytes
from quant.convert import Progress, QuantOptions, QuantReport, quantize_checkpoint
from quant.errors import QuantError
from quant.files import load_json_object
from quant.gguf_out import temp_dir_for
from quant.mapping import gguf_tensor_specs
from quant.outlock import output_lock, write_error

HEADER_ALLOWANCE = 16 << 20  # metadata + tokenizer + alignment padding, generous
SIZE_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str, flag: str = "--split-max-size") -> int:
    """'50G' -> 50_000_000_000 (decimal units, like llama.cpp's gguf-split); '85.5GiB' -> binary; '20933888'."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if m is None or float(m.group(1)) <= 0:
        raise UsageError(f"{flag} {text!r}: expected a size such as 90G, 85.5GiB, 500M or a number of bytes")
    unit = SIZE_UNITS[m.group(2)] if not m.group(3) else 1024 ** " KMGT".index(m.group(2) or " ")
    return int(float(m.group(1)) * unit)


def output_tag(options: QuantOptions) -> str:
    """The recipe part of a default output name: "mxfp4-q8_0", or "fit-6.68MiB" for a fitted quant (which must
    never take the name, or the place, of its base recipe's file)."""
    if options.budget:
        return "fit-" + human_bytes(options.budget).replace(" ", "")
    return f"{options.experts}-{options.dense}"


def resolve_source(ref: ModelRef, options: QuantOptions) -> tuple[Path, Path]:
    """(checkpoint folder, default output) for a checkpoint folder or a pulled registry / Hub model."""
    if ref.kind == "checkpoint":
        return ref.path, ref.path.parent / f"{ref.path.name}-{output_tag(options)}.gguf"
    if ref.kind == "gguf":
        what = "a GGUF file (already quantized)" if ref.path.is_file() else "not found"
        raise UsageError(f"{ref.text} is {what}", hint="quantize takes a checkpoint folder or a model name")
    spec = ref.spec
    folder = spec.local_dir
    state = checkpoint_state(folder)
    if state != "complete":
        what = "partly downloaded" if state == "partial" else "not downloaded"
        raise UsageError(f"model '{spec.name}' is {what} ({folder})", hint=f"run `dsv4 pull {spec.name}` first")
    return folder, default_gguf_path(spec, output_tag(options))


def estimated_bytes(folder: Path, options: QuantOptions) -> int:
    """Output size from the tensor list (exact payload) plus a header allowance."""
    try:
        config = load_json_object(folder / "config.json")
        mix = dict(options.mix)
        specs = gguf_tensor_specs(config, experts=options.experts, dense=options.dense, mtp=options.mtp, mix=mix)
    except (OSError, ValueError, QuantError):
        return 0  # the converter reports a bad config with its file name and a hint
    return sum(s.nbytes for s in specs) + HEADER_ALLOWANCE


def quantize(
    model: ModelRef | str,
    *,
    output: Path | None,
    options: QuantOptions,
    force: bool = False,
    progress: Progress | None = None,
) -> QuantReport:
    """Convert MODEL into a GGUF; raises before writing anything when the output exists or the disk is too small."""
    ref = resolve_model(model) if isinstance(model, str) else model
    folder, default_out = resolve_source(ref, options)
    out = (output or default_out).expanduser().resolve()
    if out.suffix != ".gguf":
        raise UsageError(f"-o {out}: the output name must end in .gguf")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, out.parent) from e
    with output_lock(out):  # held through the checks below and the conversion: one writer per output
        existing = [p for p in [out, *out.parent.glob(f"{out.stem}-*-of-*.gguf")] if p.exists()]
        if existing and not force:
            raise UsageError(f"{existing[0]} already exists", hint="pass --force to replace it, or choose -o")
        partial = temp_dir_for(out)  # a resumed run only writes what is still missing
        needed = estimated_bytes(folder, options) - sum(p.stat().st_size for p in partial.glob("*") if p.is_file())
        free = shutil.disk_usage(out.parent).free
        if needed > free:
            raise DiskSpaceError(
                f"not enough free disk in {out.parent}: the GGUF needs about {human_bytes(needed)}, "
                f"{human_bytes(free)} is free",
                hint="free some space or choose another -o",
            )
        report = quantize_checkpoint(folder, out, options, progress)
        stale = set(existing) - {Path(p) for p in report.outputs}
        for path in stale:  # shards of an earlier, differently split output under --force
            path.unlink(missing_ok=True)
    return report
