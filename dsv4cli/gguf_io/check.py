"""Check a GGUF's header against what the bundled llama.cpp's deepseek4 loader needs, before it sees the file.

llama.cpp aborts the whole process (GGML_ASSERT, SIGFPE) on several bad values instead of returning an error
(docs/formats.md §Hard constraints), so `dsv4 chat` reads the header with the bounded reader first and turns every
known hazard into a one-line RuntimeLoadError naming the key or tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv4cli.errors import PlanError, RuntimeLoadError
from dsv4cli.gguf_io.read import GgufHeader, read_header
from quant import gguf_keys as k
from quant.archs import ARCHS, V4
from quant.files import shown
from quant.gguf_keys import Key
from quant.layout import model_tensors, nextn_tensors

ARCH = V4
ALLOWED_RATIOS = (0, 4, 128)
MAX_LAYERS, MAX_EXPERTS = 512, 1024  # LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS (src/llama-hparams.h; the latter asserted)
HINT_REQUANTIZE = "re-create it with `dsv4 quantize`"
# Generic per-expert/per-tensor scales that the loader tolerates (docs/formats.md §Tensor names).
_TOLERATED_EXTRA = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_(exps|shexp)\.scale$")
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class GgufInfo:
    """What the engines need from the header: the architecture, the chat template and its special tokens, and
    whether the file carries an MTP block llama.cpp can draft with."""

    arch: str
    block_count: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    mtp_layers: int = 0


def check_gguf(path: Path) -> GgufInfo:
    """Read only the header of `path` (through the bounded reader, `dsv4cli.gguf_io.read`) and verify the deepseek4
    hard constraints.

    Raises:
        RuntimeLoadError: missing or unreadable file, a damaged or oversized header, wrong architecture (with a
            dedicated message for V4.1), or a key/tensor that would make llama.cpp fail or abort.
            Also a split GGUF given by a later shard, with a shard missing or with shards of different conversions.
    """
    return check_header(read_checked_header(path))


def read_checked_header(path: Path) -> GgufHeader:
    """The whole header of every shard, tokenizer included, with the reader's errors as RuntimeLoadError."""
    if not path.exists():  # a folder, FIFO or device is refused by the reader, by name
        raise RuntimeLoadError(
            f"GGUF file not found: {path}", hint="give a .gguf path or a model name from `dsv4 models`"
        )
    try:
        return read_header(path, tokenizer=True)
    except PlanError as e:
        raise RuntimeLoadError(str(e), hint=e.hint) from e


def check_header(header: GgufHeader) -> GgufInfo:
    """The deepseek4 hard constraints on a header already read (with its tokenizer), named after its first shard."""
    return _Header(header.files[0], header.fields, tensor_names=[t.name for t in header.tensors]).check()


class _Header:
    """Typed access to the key/value fields of one GGUF, with errors that name the key."""

    def __init__(self, path: Path, fields: dict[str, Any], *, tensor_names: list[str]) -> None:
        self.path = path
        self.fields = fields
        self.tensor_names = tensor_names

    def fail(self, what: str) -> RuntimeLoadError:
        return RuntimeLoadError(f"{self.path}: {what}", hint=HINT_REQUANTIZE)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise self.fail(f"required key {key} is missing")
        return value

    def need_int(self, key: Key | str, *, default: int | None = None) -> int:
        """An integer key (an architecture key, or a full name); per-layer arrays (allowed for some head/expert
        counts) must hold one value."""
        name = _full(key)
        value = _uniform(self.need(name) if default is None else self.get(name, default))
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"key {name} must be an integer, got {shown(value)}")
        return value

    def need_ints(self, key: Key) -> list[int]:
        value = self.need(_full(key))
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.fail(f"key {_full(key)} must be an array of integers")
        return value

    def check(self) -> GgufInfo:
        arch = self.need(k.ARCHITECTURE)
        family = ARCHS.get(arch) if isinstance(arch, str) else None  # a damaged header may hold any value
        if family is not None and not family.runs:
            raise RuntimeLoadError(f"{self.path} is a {family.title} GGUF: {family.refusal}", hint=family.refusal_hint)
        if arch != ARCH:
            raise RuntimeLoadError(
                f"{self.path} has architecture {arch!r}, not {ARCH!r}; dsv4 chat runs DeepSeek V4 GGUFs only",
                hint="quantize a V4 checkpoint with `dsv4 quantize`",
            )
        n_layer = self.need_int(k.BLOCK_COUNT)
        if not 0 < n_layer <= MAX_LAYERS:
            raise self.fail(f"{_full(k.BLOCK_COUNT)} {n_layer} is outside 1..{MAX_LAYERS} (llama.cpp's limit)")
        self._check_bounds()
        self._check_attention()
        self._check_moe(n_layer)
        ratios = self._check_ratios(n_layer)
        tokens = self._check_tokens()
        mtp_layers = self._check_tensors(n_layer, ratios)
        template = self.get(k.CHAT_TEMPLATE)
        return GgufInfo(
            arch=arch,
            block_count=n_layer,
            chat_template=template if isinstance(template, str) else None,
            bos_token=tokens[self.need_int(k.BOS_TOKEN_ID, default=0)],
            eos_token=tokens[self.need_int(k.EOS_TOKEN_ID, default=1)],
            mtp_layers=mtp_layers,
        )

    def _check_bounds(self) -> None:
        """Integer hyper-parameters llama.cpp loops over or sizes buffers by get the bounds their config.json fact
        gets (`quant.config.INTS`): 10^9 Sinkhorn iterations would make every token take minutes. block_count has
        its own check (llama.cpp's layer limit, MTP block included)."""
        from quant.config import INTS

        for key in (*k.ARCH_KEYS, k.NEXTN_PREDICT_LAYERS):
            if key is k.BLOCK_COUNT or key.gguf_type != k.UINT32 or key.config not in INTS:
                continue
            if _full(key) not in self.fields:
                continue
            value = self.need_int(key)
            low, high = INTS[key.config]
            if not low <= value <= high:
                raise self.fail(f"{_full(key)} is {value}, outside {low}..{high}")

    def _check_attention(self) -> None:
        if _uniform(self.get(_full(k.HEAD_COUNT_KV))) != 1:
            raise self.fail(f"{_full(k.HEAD_COUNT_KV)} must be present and 1 (MQA)")
        head_count = self.need_int(k.HEAD_COUNT)
        key_length = self.need_int(k.KEY_LENGTH)
        if self.need_int(k.VALUE_LENGTH) != key_length:
            raise self.fail(f"{_full(k.VALUE_LENGTH)} must equal key_length ({key_length})")
        groups = self.need_int(k.OUTPUT_GROUP_COUNT)
        if groups <= 0 or head_count % groups:
            raise self.fail(f"{_full(k.HEAD_COUNT)} {head_count} is not divisible by output_group_count {groups}")
        if self.need_int(k.ROPE_DIMENSION_COUNT, default=key_length) > key_length:
            raise self.fail(f"{_full(k.ROPE_DIMENSION_COUNT)} exceeds key_length {key_length}")
        index_len = self.need_int(k.INDEXER_KEY_LENGTH)
        if index_len <= 0 or index_len % 64:
            raise self.fail(f"{_full(k.INDEXER_KEY_LENGTH)} {index_len} is not a multiple of 64")
        if self.need_int(k.HC_COUNT) != 4:
            raise self.fail(f"{_full(k.HC_COUNT)} must be 4 (llama.cpp asserts it)")

    def _check_moe(self, n_layer: int) -> None:
        if self.need_int(k.EXPERT_GATING_FUNC) != 4:
            raise self.fail(f"{_full(k.EXPERT_GATING_FUNC)} must be 4 (sqrtsoftplus)")
        n_expert = self.need_int(k.EXPERT_COUNT)
        used = self.need_int(k.EXPERT_USED_COUNT)
        if not 0 < used <= n_expert <= MAX_EXPERTS:
            raise self.fail(f"expert_used_count {used} / expert_count {n_expert} out of range")
        self.need(_full(k.SWIGLU_CLAMP_EXP))  # the shared-expert clamp is optional
        for key in (k.SWIGLU_CLAMP_EXP, k.SWIGLU_CLAMP_SHEXP):
            value = self.get(_full(key))
            if isinstance(value, list) and len(value) != n_layer:
                raise self.fail(f"{_full(key)} has {len(value)} entries; expected block_count = {n_layer}")

    def _check_ratios(self, n_layer: int) -> list[int]:
        ratios = self.need_ints(k.COMPRESS_RATIOS)
        key = _full(k.COMPRESS_RATIOS)
        if len(ratios) < n_layer:
            raise self.fail(f"{key} must be an array of at least block_count = {n_layer}")
        ratios = ratios[:n_layer]
        if bad := sorted({r for r in ratios if r not in ALLOWED_RATIOS}):
            raise self.fail(f"{key} contains {bad}; only 0, 4 and 128 are supported")
        # A cache with zero layers crashes llama.cpp with SIGFPE at context creation (docs/formats.md).
        if 4 not in ratios:
            raise self.fail(f"{key} has no ratio-4 layer")
        same_dim = self.need_int(k.KEY_LENGTH) == self.need_int(k.INDEXER_KEY_LENGTH)
        if same_dim and 128 not in ratios:
            raise self.fail(f"{key} has no ratio-128 layer")
        return ratios

    def _check_tokens(self) -> list[str]:
        tokens = self.need(k.TOKENS)
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise self.fail(f"{k.TOKENS} must be a non-empty array of strings")
        if len(set(tokens)) != len(tokens):
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise self.fail(f"{k.TOKENS} has duplicate token string {dup!r}")
        for key in (k.BOS_TOKEN_ID, k.EOS_TOKEN_ID):
            if not 0 <= self.need_int(key, default=0) < len(tokens):
                raise self.fail(f"{key} is outside the vocabulary of {len(tokens)} tokens")
        return tokens

    def _check_tensors(self, n_layer: int, ratios: list[int]) -> int:
        """Check the tensor names against the layout; returns the number of MTP layers."""
        present = set(self.tensor_names)
        n_hash = self.need_int(k.HASH_LAYER_COUNT)
        if not 0 <= n_hash <= n_layer:
            raise self.fail(f"{_full(k.HASH_LAYER_COUNT)} {n_hash} is outside 0..block_count ({n_layer})")
        expected = set(model_tensors(ratios, n_hash))
        optional: set[str] = set()
        mtp = self._mtp_layers(n_layer, present)
        for layer in mtp:
            expected.update(nextn_tensors(layer))
            optional.update(nextn_tensors(layer, optional=True))
        if missing := sorted(expected - present):
            raise self.fail(f"tensor {missing[0]} is missing ({len(missing)} missing in all)")
        extra = [n for n in sorted(present - expected - optional) if not _tolerated_extra(n, n_layer)]
        if extra:
            raise self.fail(f"unexpected tensor {extra[0]} (llama.cpp rejects extra tensors)")
        return len(mtp)

    def _mtp_layers(self, n_layer: int, present: set[str]) -> range:
        """The MTP layers at the end of block_count, found as llama.cpp finds them: by the first one's eh_proj
        (src/models/deepseek4.cpp); without it they are main layers."""
        n_nextn = self.get(_full(k.NEXTN_PREDICT_LAYERS), 0)
        first = n_layer - n_nextn if isinstance(n_nextn, int) and 0 < n_nextn < n_layer else n_layer
        return range(first, n_layer) if f"blk.{first}.nextn.eh_proj.weight" in present else range(0)


def _full(key: Key | str) -> str:
    """The GGUF key: a deepseek4 architecture key under its prefix, a generic one as named."""
    return key.of(ARCH) if isinstance(key, Key) else key


def _uniform(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value and len(set(value)) == 1 else value


def _tolerated_extra(name: str, n_layer: int) -> bool:
    """Generic scales, the Vision-Exp bias and layers past block_count load without complaint."""
    if _TOLERATED_EXTRA.match(name) or name.endswith(".exp_probs_b_vl.bias"):
        return True
    mtp = _LAYER.match(name)
    return mtp is not None and int(mtp.group(1)) >= n_layer
