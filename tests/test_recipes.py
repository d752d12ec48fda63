"""The recipe registry (`quant.recipes`) drives every consumer: each entry is checked against ggml's own tables, and
each converts the tiny checkpoint into a GGUF the real llama.cpp loads, that `dsv4 show` and the flags know."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from quant.convert import QuantOptions, quantize_checkpoint
from quant.errors import UnsupportedError
from quant.recipes import DEFAULT_DENSE, DEFAULT_EXPERTS, DENSE, EXPERTS, RECIPES
from tests.test_quant_gguf import load_in_llama


def test_importing_the_registry_imports_nothing_heavy(python: str) -> None:
    """`dsv4 --help` reads the registry for the flag choices: numpy, gguf and llama_cpp stay unloaded."""
    code = "import sys, quant.recipes; print(sorted({'numpy', 'gguf', 'llama_cpp'} & set(sys.modules)))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("name", RECIPES)
def test_entry_matches_ggml(name: str) -> None:
    """Type id and block layout as the gguf package declares them; ftype as llama.h numbers it."""
    import llama_cpp

    recipe = RECIPES[name]
    ggml_type = GGMLQuantizationType[name.upper()]
    assert recipe.ggml_type == ggml_type
    assert (recipe.block, recipe.block_bytes) == GGML_QUANT_SIZES[ggml_type]
    assert recipe.fallback is not None or recipe.block == 1  # every block type can fall back
    if EXPERTS in recipe.roles:
        ftypes = {v: k for k, v in vars(llama_cpp).items() if k.startswith("LLAMA_FTYPE_MOSTLY_")}
        assert name.upper() in ftypes[recipe.ftype]


def test_flags_offer_every_entry(dsv4) -> None:
    res = dsv4("quantize", "tiny", "--experts", "nope")
    assert res.code != 0 and all(n in res.stderr for n, r in RECIPES.items() if EXPERTS in r.roles)
    res = dsv4("plan", "tiny", "--dense", "nope")
    assert res.code != 0 and all(n in res.stderr for n, r in RECIPES.items() if DENSE in r.roles)


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_entry_converts_loads_and_shows(
    python: str, dsv4, tiny_checkpoint: Path, tiny_imatrix: Path, tmp_path: Path, name: str
) -> None:
    """The entry in each role it has: the converter writes its type (the i-quants only with an importance matrix),
    llama.cpp loads it and generates on the deepseek4 graph, show names it."""
    roles = RECIPES[name].roles
    experts = name if EXPERTS in roles else DEFAULT_EXPERTS
    dense = name if DENSE in roles else DEFAULT_DENSE
    out = tmp_path / f"tiny-{experts}-{dense}.gguf"
    options = QuantOptions(experts=experts, dense=dense)
    if RECIPES[name].needs_imatrix:
        with pytest.raises(UnsupportedError, match=r"--(experts|dense) iq\w+ needs an importance matrix"):
            quantize_checkpoint(tiny_checkpoint, out, options)
        options = replace(options, imatrix=str(tiny_imatrix))
    quantize_checkpoint(tiny_checkpoint, out, options)
    types = {t.name: int(t.tensor_type) for t in GGUFReader(out).tensors}
    tensor = "blk.0.ffn_gate_exps.weight" if EXPERTS in roles else "blk.0.attn_q_a.weight"
    assert types[tensor] == RECIPES[name].ggml_type
    assert load_in_llama(python, out)["plain"] > 0
    shown = json.loads(dsv4("show", str(out), "--json").stdout)
    assert shown["recipe"] == {"experts": experts, "dense": dense}
    assert any(name.upper() in row["types"] for row in shown["classes"].values())
