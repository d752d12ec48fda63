"""The model registry: `models.toml` (built in) plus `$DSV4_HOME/models.toml` (the user's additions).

Entries are validated strictly (an unknown key is an error, so a typo cannot pass silently) and looked up
by exact name only; close matches are offered in the error, never picked.
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dsv4cli.errors import RegistryError, UnknownModelError
from dsv4cli.home import dsv4_home, models_dir
from dsv4cli.hub.safe_paths import name_problem
from quant.archs import ARCHS, V4
from quant.config import facts_of
from quant.errors import CheckpointError, QuantError
from quant.files import read_bounded

BUILTIN_REGISTRY = Path(__file__).resolve().parents[2] / "models.toml"

EXPERT_DTYPES = ("fp4", "fp8")
MAX_REGISTRY_BYTES = 1 << 20
# A registry name becomes a folder name under $DSV4_HOME/models: one plain component, nothing path-like.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
# A Hub repo id `org/name`, with the Hub's own rules (no `--` or `..`).
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

# config.json of DeepSeek-V4-Flash (docs/formats.md §Checkpoint layout); registry entries override what differs.
V4_DEFAULTS: dict[str, Any] = {
    "hidden_size": 4096,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "o_lora_rank": 1024,
    "o_groups": 8,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "num_hash_layers": 3,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "sliding_window": 128,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "type": "yarn",
    },
    "max_position_embeddings": 1048576,
    "vocab_size": 129280,
    "swiglu_limit": 10.0,
    "num_nextn_predict_layers": 1,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}

# A family's own keys with no V4 default (`Arch.config_defaults`, e.g. V4.1's Engram facts).
FAMILY_KEYS = set().union(*(a.config_defaults for a in ARCHS.values()))
CONFIG_KEYS = set(V4_DEFAULTS) | FAMILY_KEYS | {"compress_ratios"}


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. `config` holds config.json facts (flat, official key names)."""

    name: str
    description: str = ""
    repo: str | None = None
    revision: str = "main"
    builtin: bool = False
    download_bytes: int | None = None
    expert_dtype: str = "fp4"
    arch: str = V4
    gguf_repos: tuple[str, ...] = ()  # Hub repos of pre-quantized GGUFs of this model (`dsv4 pull NAME:TAG`)
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        if not _is_name(self.name) and not (self.name == self.repo and _is_repo_id(self.name)):
            raise RegistryError(
                f"{where}: a model name must be letters, digits and . _ + - (at most 100, not a path)",
                hint="rename the entry",
            )
        if self.repo is not None and not _is_repo_id(self.repo):
            raise RegistryError(f"{where}: repo must be a Hub repo id like 'org/name', got {self.repo!r}")
        if not self.description.isprintable():
            raise RegistryError(f"{where}: description must be one line of printable text")
        if name_problem(self.revision):
            raise RegistryError(f"{where}: revision must be a branch, tag or commit, got {self.revision!r}")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise RegistryError(f"{where}: expert_dtype must be one of {EXPERT_DTYPES}, got {self.expert_dtype!r}")
        if self.arch not in ARCHS:
            raise RegistryError(f"{where}: arch must be one of {tuple(ARCHS)}, got {self.arch!r}")
        bad = [r for r in self.gguf_repos if not _is_repo_id(r)]
        if bad:
            raise RegistryError(f"{where}: gguf_repos must be Hub repo ids like 'org/name', got {bad}")
        if not self.builtin and not self.repo:
            raise RegistryError(f"{where}: needs a repo (or builtin = true)")
        unknown = set(self.config) - CONFIG_KEYS
        if unknown:
            raise RegistryError(f"{where}: unknown config keys {sorted(unknown)}")
        if self.config:  # the config.json this entry writes or plans from gets config.json's own checks
            try:
                facts_of(self.hf_config())
            except QuantError as e:
                message = str(e).removeprefix("config.json: ")
                raise RegistryError(f"{where}: config: {message}", hint="fix the entry's [config] values") from e

    @property
    def facts(self) -> dict[str, Any]:
        """Flat architecture facts: defaults overlaid with this entry's config."""
        merged = copy.deepcopy(V4_DEFAULTS)
        arch = ARCHS[self.arch]
        merged.update(copy.deepcopy(arch.config_defaults))
        if arch.text_config:  # the nested layout names the rope scaling type `rope_type`
            merged["rope_scaling"]["rope_type"] = merged["rope_scaling"].pop("type")
        merged.update(copy.deepcopy(self.config))
        if "compress_ratios" not in merged:
            raise RegistryError(f"models.toml entry '{self.name}': config needs compress_ratios")
        return merged

    def hf_config(self) -> dict[str, Any]:
        """The config.json this model ships, in the official layout (nested `text_config` for V4.1)."""
        facts = self.facts
        block = facts.pop("weight_block_size", 128)
        quant = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [block, block],
        }
        arch = ARCHS[self.arch]
        if arch.text_config:
            quant["expert_dtype"] = self.expert_dtype
            facts.pop("num_hash_layers")  # V4.1 has no hash-routed layers and no such key (docs/formats.md §Engram)
            text = {"model_type": f"{arch.model_type}_text", **facts}
            root_ids = {k: text.pop(k) for k in ("bos_token_id", "eos_token_id", "torch_dtype")}
            return {
                "architectures": [arch.hf_class],
                "model_type": arch.model_type,
                "dtype": root_ids.pop("torch_dtype"),
                **root_ids,
                "pad_token_id": 2,
                "quantization_config": quant,
                "text_config": text,
            }
        for key in FAMILY_KEYS:
            facts.pop(key, None)
        config: dict[str, Any] = {"architectures": [arch.hf_class], "model_type": arch.model_type}
        if self.expert_dtype == "fp4":
            config["expert_dtype"] = "fp4"
        config.update(facts)
        config["quantization_config"] = quant
        return config

    @property
    def slug(self) -> str:
        """The name as one path component: an ad-hoc Hub id `org/name` becomes `org--name`."""
        return self.name.replace("/", "--")

    @property
    def local_dir(self) -> Path:
        """Default download folder under `$DSV4_HOME/models/`."""
        return models_dir() / self.slug


ENTRY_KEYS = {f.name for f in fields(ModelSpec)} - {"name"}  # the name is the TOML table's key
# What TOML type each key must have (a `repo = 3` must fail here, not deep inside a download).
ENTRY_TYPES: dict[str, type] = {
    "description": str,
    "repo": str,
    "revision": str,
    "builtin": bool,
    "download_bytes": int,
    "expert_dtype": str,
    "arch": str,
    "gguf_repos": list,
    "config": dict,
}


def _bool_for_number(key: str, value: object) -> bool:
    """`download_bytes = true` passes isinstance(int) (bool is an int in Python); it is still wrong."""
    return isinstance(value, bool) and ENTRY_TYPES[key] is not bool


def _is_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and ".." not in name


def _is_repo_id(repo: object) -> bool:
    return isinstance(repo, str) and bool(_REPO_ID.fullmatch(repo)) and ".." not in repo and "--" not in repo


def _read_entries(path: Path) -> dict[str, ModelSpec]:
    """Every entry of one registry file; anything malformed is a RegistryError naming the file (and entry)."""
    try:
        data = tomllib.loads(read_bounded(path, MAX_REGISTRY_BYTES).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{path}: not valid TOML ({e})", hint="fix the file or remove it") from e
    except RecursionError as e:  # tomllib recurses per level of nested arrays or inline tables
        raise RegistryError(f"{path}: not valid TOML (nested too deeply)", hint="fix the file or remove it") from e
    except CheckpointError as e:  # not a regular file, too large, unreadable: the message names the file
        raise RegistryError(str(e), hint="fix the file or remove it") from e
    unknown_top = set(data) - {"models"}
    models = data.get("models", {})
    if unknown_top or not isinstance(models, dict):
        raise RegistryError(f"{path}: entries go under [models.NAME], and nothing else may be at the top level")
    specs = {}
    for name, entry in models.items():
        where = f"{path}: model {name!r}"
        if not isinstance(entry, dict):
            raise RegistryError(f"{where} must be a table ([models.NAME])")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise RegistryError(f"{where} has unknown keys {sorted(unknown)}")
        wrong = sorted(k for k, v in entry.items() if not isinstance(v, ENTRY_TYPES[k]) or _bool_for_number(k, v))
        if wrong:
            raise RegistryError(f"{where}: wrong type for {wrong}")
        try:
            specs[name] = ModelSpec(name=name, **{**entry, "gguf_repos": tuple(entry.get("gguf_repos", ()))})
        except RegistryError as e:
            raise RegistryError(f"{path}: {e}", hint=e.hint) from e
    return specs


def load_registry() -> dict[str, ModelSpec]:
    """Built-in entries, then the user's file (which may add or replace entries)."""
    specs = _read_entries(BUILTIN_REGISTRY)
    user_file = dsv4_home() / "models.toml"
    if user_file.exists():
        specs.update(_read_entries(user_file))
    return specs


def get_model(name: str) -> ModelSpec:
    """Look `name` up exactly; `org/name` not in the registry becomes an ad-hoc Hub spec."""
    specs = load_registry()
    if name in specs:
        return specs[name]
    for spec in specs.values():
        if spec.repo and spec.repo.lower() == name.lower():
            return spec
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return ModelSpec(name=name, repo=name, description="Hub repo (not in the registry)")
    close = difflib.get_close_matches(name, list(specs), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "run `dsv4 models` to list known names"
    raise UnknownModelError(f"unknown model '{name}'", hint=hint)
