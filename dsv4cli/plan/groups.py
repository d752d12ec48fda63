"""Tensor classes and the per-layer groups placement moves as units.

A tensor's class (from its GGUF name, docs/formats.md §Tensor names) decides where it may go: routed experts are
read k/E per token, Engram tables sparsely, everything else once per token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from quant.archs import ARCHS

# The families' lookup-table classes (`quant.archs`: Engram tables), by name.
LOOKUP_CLASSES = {c.name: c for arch in ARCHS.values() for c in arch.plan_classes}
EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.")
LAYER_RE = re.compile(r"^blk\.(\d+)\.")
CLASS_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("mtp", re.compile(r"\.nextn\.")),
    ("token_embd", re.compile(r"^token_embd\.")),
    ("output_head", re.compile(r"^output")),
    ("routed_experts", EXPERT_RE),
    *((c.name, re.compile(c.pattern)) for c in LOOKUP_CLASSES.values()),
    ("shared_expert", re.compile(r"_shexp\.")),
    ("router", re.compile(r"\.(ffn_gate_inp|exp_probs_b\w*|ffn_gate_tid2eid)\.")),
    ("hyper_connection", re.compile(r"\.hc_")),
    ("norm", re.compile(r"norm\.weight$")),
)


def tensor_class(name: str, n_layer: int) -> str:
    """The class of a tensor of a model with `n_layer` main layers. The MTP block of an `--mtp` GGUF (its
    `nextn.*` tensors and the rest of its layer, numbered from n_layer up) is "mtp": llama.cpp loads it only for
    drafting, so placement skips it."""
    layer = layer_of(name)
    if layer is not None and layer >= n_layer:
        return "mtp"
    for cls, pattern in CLASS_RULES:
        if pattern.search(name):
            return cls
    return "attention"


def class_pattern(cls: str) -> str:
    """The regular expression of a tensor class (for llama.cpp's tensor overrides)."""
    return next(pattern.pattern for name, pattern in CLASS_RULES if name == cls)


def layer_of(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass
class Layers:
    """Per-layer byte sums that placement moves as units."""

    dense: list[int]
    experts: list[int]
    root_gpu: int  # output head
    host_fixed: int  # token_embd
    engram: list[tuple[str, int]]


def group_layers(tensors: Sequence[Any], n_layer: int) -> Layers:
    groups = Layers([0] * n_layer, [0] * n_layer, 0, 0, [])
    for spec in tensors:
        cls, layer = tensor_class(spec.name, n_layer), layer_of(spec.name)
        if cls == "mtp":
            continue
        if cls == "token_embd":
            groups.host_fixed += spec.nbytes
        elif cls == "engram":
            groups.engram.append((spec.name, spec.nbytes))
        elif cls == "routed_experts" and layer is not None:
            groups.experts[layer] += spec.nbytes
        elif layer is None:
            groups.root_gpu += spec.nbytes
        else:
            groups.dense[layer] += spec.nbytes
    return groups
