"""Damaged homes and the remaining hostile-input classes: a manifest nested 100,000 deep, a model folder dsv4 may not
read, registry configs with bad dimensions, deeply nested TOML and JSON, tokenizers with a duplicate id or no
tokens, a GGUF declaring 10^9 Sinkhorn iterations, a link planted at quantize's partial output.

Each must end in one line (or be listed as damaged/unreadable), never a traceback, a hang or a huge allocation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_chat_gguf_check import A, rewrite


def _one_line(result, words: str) -> None:
    assert result.code == 1 and words in result.stderr, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result


def test_a_manifest_nested_100000_deep_is_listed_as_damaged(dsv4, isolated_env: Path) -> None:
    folder = isolated_env / "models" / "org--deep"
    folder.mkdir(parents=True)
    (folder / ".dsv4-pull.json").write_text('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}")
    result = dsv4("list", "--json")
    assert result.code == 0, result.stderr
    assert [(m["name"], m["state"]) for m in json.loads(result.stdout)] == [("org/deep", "damaged")]
    assert "(damaged)" in dsv4("list").stdout
    _one_line(dsv4("rm", "org/deep", "--yes"), "damaged")


def test_a_folder_dsv4_may_not_read_is_listed_as_unreadable(python: str, tmp_path: Path) -> None:
    """Root reads any folder: as root, `dsv4 list` runs under setpriv without the capabilities that bypass file
    modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a mode-000 folder is as unreadable to it as to a user."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a folder unreadable to dsv4")
        drop = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"]
    models = tmp_path / "home" / "models"
    (models / "org--locked").mkdir(parents=True)
    (models / "org--locked" / ".dsv4-pull.json").write_text("{}")
    (models / "org--open" / ".dsv4-partial").mkdir(parents=True)
    (models / "org--locked").chmod(0)
    try:
        result = subprocess.run(
            [*prefix, python, "-m", "dsv4cli", "list", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "DSV4_HOME": str(tmp_path / "home")},
        )
    finally:
        (models / "org--locked").chmod(0o755)
    assert result.returncode == 0, result.stderr
    states = {m["name"]: m["state"] for m in json.loads(result.stdout)}
    assert states == {"org/locked": "unreadable", "org/open": "partial"}


BAD_DIMS = [0, -1, 1 << 40, "64", 1.5, True]


@pytest.mark.parametrize("value", BAD_DIMS)
@pytest.mark.parametrize("command", [("pull",), ("plan",)])
def test_a_builtin_registry_entry_with_bad_dimensions_is_one_line(dsv4, isolated_env, value, command) -> None:
    isolated_env.mkdir(parents=True, exist_ok=True)
    shown = json.dumps(value).lower()
    (isolated_env / "models.toml").write_text(
        f'[models.evil]\nbuiltin = true\ndescription = "x"\n[models.evil.config]\nhidden_size = {shown}\n'
        "num_hidden_layers = 4\ncompress_ratios = [0, 0, 4, 128, 0]\n"
    )
    _one_line(dsv4(*command, "evil"), "hidden_size")


def test_a_builtin_entry_with_real_dimensions_is_not_written(dsv4, isolated_env) -> None:
    isolated_env.mkdir(parents=True, exist_ok=True)
    (isolated_env / "models.toml").write_text(
        '[models.huge]\nbuiltin = true\ndescription = "x"\n[models.huge.config]\ncompress_ratios = '
        + json.dumps([0, 0] + [4, 128] * 20 + [4, 0])
        + "\n"
    )
    _one_line(dsv4("pull", "huge"), "too large to write")
    written = [p for p in (isolated_env / "models").rglob("*") if p.is_file() and p.name != ".dsv4-pull.lock"]
    assert written == []


def test_deeply_nested_toml_is_one_line(dsv4, isolated_env) -> None:
    isolated_env.mkdir(parents=True, exist_ok=True)
    (isolated_env / "models.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    _one_line(dsv4("plan", "tiny"), "nested too deeply")


@pytest.mark.parametrize("text", ["[1, 2]", "[" * 100_000 + "]" * 100_000, '"a string"'])
def test_a_config_json_that_is_not_an_object_is_one_line(dsv4, tiny_checkpoint: Path, tmp_path, text) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "config.json").write_text(text)
    for command in ("plan", "show"):
        _one_line(dsv4(command, str(folder)), "config.json")


@pytest.mark.parametrize("damage", ["duplicate", "empty"])
def test_a_tokenizer_with_a_duplicate_id_or_no_tokens_is_refused(dsv4, tiny_checkpoint, tmp_path, damage) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    if damage == "duplicate":
        first, second = list(vocab)[:2]
        vocab[second] = vocab[first]
    else:
        tokenizer["model"]["vocab"] = {}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "out.gguf"
    _one_line(dsv4("quantize", str(folder), "-o", str(out)), "both have id" if damage == "duplicate" else "empty")
    assert not out.exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [("hyper_connection.sinkhorn_iterations", 10**9), ("expert_shared_count", 10**6), ("context_length", 1 << 31)],
)
def test_gguf_hyper_parameters_are_bounded_at_the_header_check(tiny_gguf, tmp_path, key, value) -> None:
    from dsv4cli.errors import RuntimeLoadError
    from dsv4cli.gguf_io.check import check_gguf

    with pytest.raises(RuntimeLoadError, match=f"{key} is {value}, outside"):
        check_gguf(rewrite(tiny_gguf, tmp_path / "bad.gguf", set_={A + key: value}))


def test_chat_refuses_a_billion_sinkhorn_iterations_at_once(tiny_gguf, tmp_path, python) -> None:
    bad = rewrite(tiny_gguf, tmp_path / "bad.gguf", set_={A + "hyper_connection.sinkhorn_iterations": 10**9})
    result = subprocess.run(
        [python, "-m", "dsv4cli", "chat", str(bad), "-p", "hi", "--max-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )
    assert result.returncode == 1 and "sinkhorn_iterations is 1000000000" in result.stderr


def test_a_link_planted_at_the_partial_output_is_not_followed(dsv4, tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "out.gguf"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (tmp_path / ".out.gguf.partial").symlink_to(victim)
    (tmp_path / ".out.gguf.lock").symlink_to(victim / "lock-target")
    result = dsv4("quantize", str(tiny_checkpoint), "-o", str(out))
    assert result.code in (0, 1) and "Traceback" not in result.stderr, result
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]  # nothing written through either link
    assert (victim / "keep.txt").read_text() == "mine"


def test_a_link_planted_at_a_partial_shard_is_not_followed(tiny_checkpoint, tmp_path) -> None:
    """A resumed conversion finds a link where its data file was: it starts over, never writing through it."""
    from quant.convert import QuantOptions, quantize_checkpoint

    out = tmp_path / "out.gguf"
    partial = tmp_path / ".out.gguf.partial"
    partial.mkdir()
    target = tmp_path / "target.bin"
    target.write_bytes(b"precious")
    (partial / "journal.jsonl").write_text("{}\n")
    (partial / out.name).symlink_to(target)
    quantize_checkpoint(tiny_checkpoint, out, QuantOptions())
    assert target.read_bytes() == b"precious" and out.is_file()
