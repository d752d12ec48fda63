"""A GGUF opened for loading: its header read once (every shard, tokenizer included), checked against what the
bundled llama.cpp would abort on, with the facts a plan places (`dsv4cli.plan.source_facts`).

Every later step of a load (the plan or plan-file check, the prompt renderer, the MTP decision, the engine's
preflight) reads this value instead of the file, so a load reads each header once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsv4cli.gguf_io.check import GgufInfo, check_header, read_checked_header
from dsv4cli.gguf_io.read import GgufHeader
from dsv4cli.plan.source_facts import ModelSource, source_from_header


@dataclass(frozen=True)
class ModelFile:
    """The checked header of one GGUF (its first shard is `path`) and what it says."""

    path: Path
    header: GgufHeader
    info: GgufInfo  # the header check's result: architecture, chat template and special tokens, MTP layers
    source: ModelSource  # the tensors and architecture facts a plan places

    @property
    def has_mtp(self) -> bool:
        """The file carries a nextn (multi-token prediction) block llama.cpp can draft with."""
        return self.info.mtp_layers > 0


def open_model_file(path: Path) -> ModelFile:
    """Read and check the header of `path` (RuntimeLoadError naming the key or tensor llama.cpp would abort on)."""
    header = read_checked_header(path)
    info = check_header(header)
    return ModelFile(path=path, header=header, info=info, source=source_from_header(header, path.name))
