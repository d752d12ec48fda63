"""The registry: built-in entries carry the published architecture facts; user entries are validated strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4cli.errors import RegistryError, UnknownModelError
from dsv4cli.local import MANIFEST_NAME
from dsv4cli.registry import get_model, load_registry

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
        "[models.my-flash.config]\nhidden_size = 1024\ncompress_ratios = [0, 4, 128]\n"
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
