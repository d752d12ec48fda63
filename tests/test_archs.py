"""The family descriptors (`quant.archs`) against what was written without them: the tiny checkpoint writers
(`dsv4cli.models.tiny`) and the GGUFs converted from them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gguf import GGUFReader

from dsv4cli.engine.preflight import require_runnable
from dsv4cli.errors import RuntimeLoadError
from quant.archs import ARCHS
from quant.convert import QuantOptions, check_checkpoint, quantize_checkpoint
from quant.mapping import facts_of, gguf_name, plan_tensors
from quant.safetensors import Checkpoint
from quant.source import scale_name


@pytest.mark.parametrize(("fixture", "mtp"), [("tiny_checkpoint", True), ("tiny_v41_checkpoint", False)])
def test_layout_rows_cover_the_tiny_writer(request: pytest.FixtureRequest, fixture: str, mtp: bool) -> None:
    """Every tensor the independent writer wrote is a source of exactly one planned tensor (or dropped on purpose),
    and every source the rows name exists with the shape they imply."""
    ckpt = Checkpoint(request.getfixturevalue(fixture))
    try:
        facts = facts_of(ckpt.config)
        plans = plan_tensors(ckpt.config, mtp=mtp)
        check_checkpoint(ckpt, facts, plans, mtp=mtp)
        sources = [s for p in plans for s in p.sources]
        assert len(sources) == len(set(sources))
        mapped = {n for n in ckpt.names() if gguf_name(n, facts, mtp=mtp)}
        assert mapped == set(sources) | {scale_name(s) for s in sources if scale_name(s) in ckpt}
    finally:
        ckpt.close()


def test_metadata_rows_are_declared_once() -> None:
    for arch in ARCHS.values():
        names = [k.name for k in arch.metadata_keys]
        assert len(names) == len(set(names)), arch.name


def test_v41_gguf_has_every_metadata_row(tiny_v41_checkpoint: Path, tmp_path: Path) -> None:
    """The written file carries each row the family declares (rope scaling and MTP only when they apply)."""
    out = tmp_path / "v41.gguf"
    quantize_checkpoint(tiny_v41_checkpoint, out, QuantOptions())
    arch = ARCHS["deepseek41"]
    fields = set(GGUFReader(out).fields)
    assert {k.of(arch.name) for k in arch.keys} <= fields
    assert arch.name + ".nextn_predict_layers" not in fields


@pytest.mark.parametrize("name", ARCHS)
def test_engine_refuses_exactly_the_families_it_cannot_run(name: str) -> None:
    arch = ARCHS[name]
    if arch.runs:
        require_runnable(name, "m")
    else:
        with pytest.raises(RuntimeLoadError, match=re.escape(arch.refusal)):
            require_runnable(name, "m")
