"""MODEL, resolved once: every command turns its MODEL argument into a `ModelRef` here and passes that down.

The forms, in the order they are tried:
* an existing file: a GGUF (the first shard of a split set names the set);
* an existing folder: an official checkpoint (config.json + safetensors);
* a bare file name `x.gguf` of a GGUF in `$DSV4_HOME/gguf` (as `dsv4 list` names `dsv4 quantize`'s outputs);
* something that looks like a path (`./x`, `/x`, `~/x`, `x.gguf`) but does not exist: a GGUF path, so the
  command that needs it reports the missing file by name;
* `org/name/file.gguf`: one GGUF in a Hub repo;
* a registry name (`dsv4 models`) or a Hub repo id `org/name`, either with an optional `:TAG`
  (a quantization tag such as `:Q4_K_M`, as Ollama and llama.cpp's `-hf` spell it: it picks the files of a
  pre-quantized GGUF repo, `dsv4cli.hub.gguf_repo`).

Adding an input kind is one branch in `resolve_model` and one value of `RefKind`. Which local GGUF a reference
means is one rule too, `dsv4cli.load.resolve`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dsv4cli.home import gguf_dir
from dsv4cli.models.registry import ModelSpec, get_model

HUB_FILE_RE = re.compile(r"^([\w.-]+/[\w.-]+)/(.+\.gguf)$")
TAG_RE = re.compile(r"^(.+?):([\w.-]+)$")


class RefKind(StrEnum):
    """What MODEL names; the values are the strings JSON output and messages have always used."""

    GGUF = "gguf"  # a GGUF file (the first shard of a split set)
    CHECKPOINT = "checkpoint"  # an official checkpoint folder
    REGISTRY = "registry"  # a registry name, or a registry entry's Hub repo id
    HUB = "hub"  # another Hub repo id, or one GGUF in it (`org/name/file.gguf`)


@dataclass(frozen=True)
class ModelRef:
    """What MODEL names (`kind`) and what it carries for that kind."""

    text: str
    kind: RefKind
    path: Path | None = None  # gguf: the file (first shard); checkpoint: the folder
    spec: ModelSpec | None = None  # registry and hub
    tag: str | None = None  # hub/registry `:TAG`
    file: str | None = None  # hub `org/name/FILE.gguf`

    @property
    def name(self) -> str:
        if self.spec is not None:
            return self.spec.name
        return self.path.name if self.path else self.text


def split_tag(text: str) -> tuple[str, str | None]:
    """`name:TAG` -> (name, TAG); (text, None) without a tag."""
    tagged = TAG_RE.match(text)
    return (tagged.group(1), tagged.group(2)) if tagged else (text, None)


def split_hub_file(text: str) -> tuple[str, str] | None:
    """`org/name/file.gguf` -> ("org/name", "file.gguf"); None for any other form (a path included)."""
    hub_file = HUB_FILE_RE.match(text)
    if hub_file is None or text.startswith((".", "/", "~")):
        return None
    return hub_file.group(1), hub_file.group(2)


def resolve_model(text: str) -> ModelRef:
    """Classify MODEL (see the module docstring); reads the registry at most once."""
    path = Path(text).expanduser()
    if path.is_file():
        return ModelRef(text, RefKind.GGUF, path=path)
    if path.is_dir():
        return ModelRef(text, RefKind.CHECKPOINT, path=path.resolve())
    if hub_file := split_hub_file(text):
        repo, file = hub_file
        return ModelRef(text, RefKind.HUB, spec=get_model(repo), file=file)
    if text.endswith(".gguf") or text.startswith((".", "/", "~")):
        converted = gguf_dir() / text
        if "/" not in text and converted.is_file():  # a file name `dsv4 list` shows for `dsv4 quantize`'s output
            return ModelRef(text, RefKind.GGUF, path=converted)
        return ModelRef(text, RefKind.GGUF, path=path)
    name, tag = split_tag(text)
    spec = get_model(name)
    ad_hoc = spec.repo == name and spec.name == name and not spec.builtin and "/" in name
    return ModelRef(text, RefKind.HUB if ad_hoc else RefKind.REGISTRY, spec=spec, tag=tag)


def file_ref(path: Path) -> ModelRef:
    """A reference to a GGUF file already resolved (what the engines and plans of a loaded model name)."""
    return ModelRef(str(path), RefKind.GGUF, path=path)
