"""The registry: built-in entries carry the published architecture facts; user entries are validated strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4cli.errors import RegistryError, UnknownModelError
from dsv4cli.models.local import MANIFEST_NAME
from dsv4cli.models.registry import get_model, load_registry

EXPECTED_NAMES = {
    "deepseek-v4-flash",
    "deepseek-v4-flash-0731",
    "deepseek-v4-flash-base",
    "deepseek-v4-pro",
    "deepseek-v4-pro-base",
    "deepseek-v4.1-flash",
    "tiny",
    "tiny-base",
    "tiny-v41",
}


def test_registry_has_every_release_and_the_tiny_models() -> None:
    assert set(load_registry()) == EXPECTED_NAMES


@pytest.mark.parametrize(
    ("name", "facts"),
    [
        # the V4-Flash model card's config.json; 43 layers + 1 MTP entry in compress_ratios
        (
            "deepseek-v4-flash",
            {"hidden_size": 4096, "num_hidden_layers": 43, "n_routed_experts": 256, "q_lora_rank": 1024},
        ),
        # V4-Pro column
        ("deepseek-v4-pro", {"hidden_size": 7168, "num_hidden_layers": 61, "n_routed_experts": 384, "o_groups": 16}),
        # V4.1 text_config: no hash layers, eps 1e-20, 32 indexer heads
        (
            "deepseek-v4.1-flash",
            {"hidden_size": 5120, "num_hash_layers": 0, "rms_norm_eps": 1e-20, "index_n_heads": 32},
        ),
    ],
)
def test_facts_match_published_configs(name: str, facts: dict) -> None:
    spec = get_model(name)
    for key, value in facts.items():
        assert spec.facts[key] == value, key


def test_layer_schedules_match_the_published_counts() -> None:
    # Model cards: Flash 2 x ratio 0, 21 x ratio 4, 20 x ratio 128 over 43 layers; Pro 30 x 4 and 31 x 128.
    flash = get_model("deepseek-v4-flash").facts["compress_ratios"][:43]
    assert (flash.count(0), flash.count(4), flash.count(128)) == (2, 21, 20)
    pro = get_model("deepseek-v4-pro").facts["compress_ratios"][:61]
    assert (pro.count(4), pro.count(128)) == (30, 31)


def test_v41_config_is_nested_like_the_release() -> None:
    config = get_model("deepseek-v4.1-flash").hf_config()
    assert config["architectures"] == ["DeepseekV41ForCausalLM"]
    assert config["quantization_config"]["weight_block_size"] == [32, 32]
    assert config["quantization_config"]["expert_dtype"] == "fp4"
    text = config["text_config"]
    assert text["engram_layer_ids"] == [1, 14]
    assert sum(text["engram_num_embeddings"]) * 264 == 202_758_032_400  # Engram table bytes (docs/formats.md §Engram)
    assert text["rope_scaling"]["rope_type"] == "yarn"


def test_base_variants_have_fp8_experts_and_no_expert_dtype_key() -> None:
    spec = get_model("deepseek-v4-flash-base")
    assert spec.expert_dtype == "fp8"
    assert "expert_dtype" not in spec.hf_config()
    assert get_model("deepseek-v4-flash").hf_config()["expert_dtype"] == "fp4"


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_model("deepseek-v4-flsh")
    assert "deepseek-v4-flash" in info.value.hint


def test_hub_repo_ids_resolve_without_registry_entry() -> None:
    spec = get_model("someone/some-model")
    assert spec.repo == "someone/some-model"
    assert get_model("deepseek-ai/DeepSeek-V4-Pro").name == "deepseek-v4-pro"


def test_user_file_adds_entries(isolated_env: Path) -> None:
    isolated_env.mkdir(parents=True, exist_ok=True)
    (isolated_env / "models.toml").write_text(
        '[models.my-flash]\nrepo = "me/my-flash"\narch = "deepseek4"\n'
        "[models.my-flash.config]\nhidden_size = 1024\nnum_hidden_layers = 3\ncompress_ratios = [0, 4, 128]\n"
    )
    spec = get_model("my-flash")
    assert spec.facts["hidden_size"] == 1024
    assert spec.facts["num_attention_heads"] == 64  # defaults fill what the entry leaves out


@pytest.mark.parametrize(
    "entry",
    [
        '[models.x]\nrepo = "a/b"\nrevison = "main"\n',  # typo in an entry key
        '[models.x]\nrepo = "a/b"\n[models.x.config]\nhiden_size = 1\n',  # typo in a config key
        '[models.x]\nrepo = "a/b"\nexpert_dtype = "fp16"\n',  # unsupported expert dtype
        '[models.x]\ndescription = "no repo"\n',  # neither repo nor builtin
    ],
)
def test_user_file_typos_are_errors(isolated_env: Path, entry: str) -> None:
    isolated_env.mkdir(parents=True, exist_ok=True)
    (isolated_env / "models.toml").write_text(entry)
    with pytest.raises(RegistryError):
        load_registry()


def test_models_json_reports_local_state(dsv4, isolated_env: Path) -> None:
    folder = isolated_env / "models" / "tiny"
    folder.mkdir(parents=True)
    (folder / MANIFEST_NAME).write_text("{}")
    partial = isolated_env / "models" / "deepseek-v4-pro"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    result = dsv4("models", "--json")
    assert result.code == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["tiny"]["checkpoint"] == "complete"
    assert rows["deepseek-v4-pro"]["checkpoint"] == "partial"
    assert rows["deepseek-v4-flash"]["checkpoint"] is None
    assert rows["deepseek-v4-flash"]["download_bytes"] == 159_609_485_896


def test_models_table_lists_every_name(dsv4) -> None:
    result = dsv4("models")
    assert result.code == 0
    for name in EXPECTED_NAMES:
        assert name in result.stdout


def test_registry_error_is_one_line_without_traceback(dsv4, isolated_env: Path) -> None:
    isolated_env.mkdir(parents=True, exist_ok=True)
    (isolated_env / "models.toml").write_text("[models.x\n")
    result = dsv4("models")
    assert result.code == 1
    assert result.stderr.startswith("error: ")
    assert "models.toml" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "name",
    ["/tmp/victim", "../victim", "a/../b", "a\\b", "C:x", "x\u0000y", "new\nline", ".", "..", ".hidden", "x" * 101, ""],
)
def test_path_like_names_are_rejected(isolated_env: Path, name: str) -> None:
    isolated_env.mkdir(parents=True, exist_ok=True)
    key = json.dumps(name)  # a TOML basic string escapes like JSON
    (isolated_env / "models.toml").write_text(f"[models.{key}]\nbuiltin = true\n")
    with pytest.raises(RegistryError) as info:
        load_registry()
    assert str(isolated_env / "models.toml") in str(info.value) and repr(name) in str(info.value)


@pytest.mark.parametrize(
    "entry",
    [
        '[models.x]\nrepo = "../../etc"\n',
        '[models.x]\nrepo = "a/b/c"\n',
        '[models.x]\nrepo = "a/b"\nrevision = "../../x"\n',
        "[models.x]\nrepo = 3\n",
        '[models.x]\nbuiltin = "yes"\n',
        '[models.x]\nrepo = "a/b"\ndownload_bytes = true\n',
        '[models.x]\nrepo = "a/b"\nconfig = 5\n',
        '[models.x]\nrepo = "a/b"\ndescription = "\\u001b[2J wiped"\n',
        "models = 3\n",
        "[models]\nx = 3\n",
    ],
)
def test_malformed_entries_are_one_line_errors_naming_the_file(dsv4, isolated_env: Path, entry: str) -> None:
    isolated_env.mkdir(parents=True, exist_ok=True)
    (isolated_env / "models.toml").write_text(entry)
    for argv in (("models",), ("pull", "tiny", "--dry-run")):
        result = dsv4(*argv)
        assert result.code == 1 and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(isolated_env / "models.toml") in lines[0], result.stderr


@pytest.mark.parametrize("kind", ["binary", "not-utf8", "huge", "folder", "dev-zero", "fifo"])
def test_unreadable_user_file_is_one_line_naming_it(dsv4, isolated_env: Path, kind: str) -> None:
    import os

    isolated_env.mkdir(parents=True, exist_ok=True)
    path = isolated_env / "models.toml"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "not-utf8":
        path.write_bytes(b'[models.x]\ndescription = "\xff\xfe"\nrepo = "a/b"\n')
    elif kind == "huge":
        path.write_text("# padding\n" * 200_000)
    elif kind == "folder":
        path.mkdir()
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)
    result = dsv4("models")
    assert result.code == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr


def test_dry_run_never_touches_a_folder_named_by_an_entry(dsv4, isolated_env: Path, tmp_path: Path) -> None:
    """The data loss in issue 8: an entry named by an absolute path made a dry run replace that folder."""
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "weights.bin").write_bytes(b"keep me")
    isolated_env.mkdir(parents=True, exist_ok=True)
    (isolated_env / "models.toml").write_text(f"[models.{json.dumps(str(victim))}]\nbuiltin = true\n")
    result = dsv4("pull", str(victim), "--dry-run")
    assert result.code == 1 and str(isolated_env / "models.toml") in result.stderr
    assert sorted(p.name for p in victim.iterdir()) == ["weights.bin"]
    assert (victim / "weights.bin").read_bytes() == b"keep me"


def test_ad_hoc_repo_ids_are_checked() -> None:
    for name in ("org/..", "org/--x", "a/b\nc"):
        with pytest.raises((RegistryError, UnknownModelError)):
            get_model(name)
