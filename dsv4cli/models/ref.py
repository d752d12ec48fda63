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

Adding an input kind is one branch in `resolve_model` and one value of `ModelRef.kind`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.home import gguf_dir
from dsv4cli.models.registry import ModelSpec, get_model

HUB_FILE_RE = re.compile(r"^([\w.-]+/[\w.-]+)/(.+\.gguf)$")
TAG_RE = re.compile(r"^(.+?):([\w.-]+)$")


@dataclass(frozen=True)
class ModelRef:
    """What MODEL names. `kind` is "gguf", "checkpoint", "registry" or "hub"."""

    text: str
    kind: str
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


def resolve_model(text: str) -> ModelRef:
    """Classify MODEL (see the module docstring); reads the registry at most once."""
    path = Path(text).expanduser()
    if path.is_file():
        return ModelRef(text, "gguf", path=path)
    if path.is_dir():
        return ModelRef(text, "checkpoint", path=path.resolve())
    hub_file = HUB_FILE_RE.match(text)
    if hub_file and not text.startswith((".", "/", "~")):
        return ModelRef(text, "hub", spec=get_model(hub_file.group(1)), file=hub_file.group(2))
    if text.endswith(".gguf") or text.startswith((".", "/", "~")):
        converted = gguf_dir() / text
        if "/" not in text and converted.is_file():  # a file name `dsv4 list` shows for `dsv4 quantize`'s output
            return ModelRef(text, "gguf", path=converted)
        return ModelRef(text, "gguf", path=path)
    name, tag = split_tag(text)
    spec = get_model(name)
    ad_hoc = spec.repo == name and spec.name == name and not spec.builtin and "/" in name
    return ModelRef(text, "hub" if ad_hoc else "registry", spec=spec, tag=tag)
