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


def test_a_new_family_is_one_registered_descriptor(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A family that only exists as an `Arch` in the registry converts, plans with its warning and is refused
    with its own message: nothing else names it."""
    import dataclasses
    import json
    import shutil

    from dsv4cli.plan import PlanInputs, make_plan
    from quant.archs import deepseek4

    family = dataclasses.replace(
        deepseek4.ARCH, name="deepseek4x", title="DeepSeek V4-X", hf_class="DeepseekV4XForCausalLM", runs=False,
        refusal="no engine runs it yet", refusal_hint="wait", plan_warning="deepseek4x: a best guess",
    )  # fmt: skip
    monkeypatch.setitem(ARCHS, family.name, family)
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "tiny-x")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": [family.hf_class]}))
    report = quantize_checkpoint(folder, tmp_path / "x.gguf", QuantOptions())
    assert report.arch == "deepseek4x"
    assert GGUFReader(tmp_path / "x.gguf").fields["deepseek4x.block_count"].contents() == config["num_hidden_layers"]
    plan = make_plan(str(tmp_path / "x.gguf"), PlanInputs(ram_gib=8, vram_gib=(), threads=1))
    assert plan.source.dims.arch == "deepseek4x" and plan.warnings == ["deepseek4x: a best guess"]
    with pytest.raises(RuntimeLoadError, match="m is a DeepSeek V4-X model: no engine runs it yet"):
        require_runnable("deepseek4x", "m")


def test_a_damaged_architecture_value_is_a_one_line_refusal(tmp_path: Path) -> None:
    """`general.architecture` of any type (here an array, as the input fuzzer writes) is refused by name."""
    from dsv4cli.errors import PlanError
    from dsv4cli.gguf_io.check import check_header
    from dsv4cli.gguf_io.read import GgufHeader
    from dsv4cli.plan.source_facts import source_from_header

    header = GgufHeader((tmp_path / "x.gguf",), {"general.architecture": ["deepseek4"]}, ())
    with pytest.raises(RuntimeLoadError, match=r"has architecture \['deepseek4'\], not 'deepseek4'"):
        check_header(header)
    with pytest.raises(PlanError, match=r"architecture \['deepseek4'\] is not DeepSeek V4"):
        source_from_header(header, "x")
