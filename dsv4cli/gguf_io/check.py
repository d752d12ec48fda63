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
from quant.arch import V4, V41
from quant.files import shown
from quant.layout import model_tensors, nextn_tensors

ARCH = V4
V41_ARCH = V41
ALLOWED_RATIOS = (0, 4, 128)
MAX_LAYERS, MAX_EXPERTS = 512, 1024  # LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS (src/llama-hparams.h; the latter asserted)
HINT_REQUANTIZE = "re-create it with `dsv4 quantize`"
V41_UNSUPPORTED = (
    "the bundled llama.cpp (llama-cpp-python 0.3.36) has no deepseek41 architecture yet; "
    "V4.1 GGUFs can be quantized and planned but not run"
)
V41_HINT = "chat with a V4 model such as deepseek-v4-flash"
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

    def need_int(self, key: str, *, default: int | None = None, full: bool = False) -> int:
        """An integer key; per-layer arrays (allowed for some head/expert counts) must hold one value."""
        name = key if full else f"{ARCH}.{key}"
        value = _uniform(self.need(name) if default is None else self.get(name, default))
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"key {name} must be an integer, got {shown(value)}")
        return value

    def need_ints(self, key: str) -> list[int]:
        value = self.need(f"{ARCH}.{key}")
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.fail(f"key {ARCH}.{key} must be an array of integers")
        return value

    def check(self) -> GgufInfo:
        arch = self.need("general.architecture")
        if arch == V41_ARCH:
            raise RuntimeLoadError(f"{self.path} is a DeepSeek V4.1 GGUF: {V41_UNSUPPORTED}", hint=V41_HINT)
        if arch != ARCH:
            raise RuntimeLoadError(
                f"{self.path} has architecture {arch!r}, not {ARCH!r}; dsv4 chat runs DeepSeek V4 GGUFs only",
                hint="quantize a V4 checkpoint with `dsv4 quantize`",
            )
        n_layer = self.need_int("block_count")
        if not 0 < n_layer <= MAX_LAYERS:
            raise self.fail(f"{ARCH}.block_count {n_layer} is outside 1..{MAX_LAYERS} (llama.cpp's limit)")
        self._check_attention()
        self._check_moe(n_layer)
        ratios = self._check_ratios(n_layer)
        tokens = self._check_tokens()
        mtp_layers = self._check_tensors(n_layer, ratios)
        template = self.get("tokenizer.chat_template")
        return GgufInfo(
            arch=arch,
            block_count=n_layer,
            chat_template=template if isinstance(template, str) else None,
            bos_token=tokens[self.need_int("tokenizer.ggml.bos_token_id", default=0, full=True)],
            eos_token=tokens[self.need_int("tokenizer.ggml.eos_token_id", default=1, full=True)],
            mtp_layers=mtp_layers,
        )

    def _check_attention(self) -> None:
        if _uniform(self.get(f"{ARCH}.attention.head_count_kv")) != 1:
            raise self.fail(f"{ARCH}.attention.head_count_kv must be present and 1 (MQA)")
        head_count = self.need_int("attention.head_count")
        key_length = self.need_int("attention.key_length")
        if self.need_int("attention.value_length") != key_length:
            raise self.fail(f"{ARCH}.attention.value_length must equal key_length ({key_length})")
        groups = self.need_int("attention.output_group_count")
        if groups <= 0 or head_count % groups:
            raise self.fail(f"{ARCH}.attention.head_count {head_count} is not divisible by output_group_count {groups}")
        if self.need_int("rope.dimension_count", default=key_length) > key_length:
            raise self.fail(f"{ARCH}.rope.dimension_count exceeds key_length {key_length}")
        index_len = self.need_int("attention.indexer.key_length")
        if index_len <= 0 or index_len % 64:
            raise self.fail(f"{ARCH}.attention.indexer.key_length {index_len} is not a multiple of 64")
        if self.need_int("hyper_connection.count") != 4:
            raise self.fail(f"{ARCH}.hyper_connection.count must be 4 (llama.cpp asserts it)")

    def _check_moe(self, n_layer: int) -> None:
        if self.need_int("expert_gating_func") != 4:
            raise self.fail(f"{ARCH}.expert_gating_func must be 4 (sqrtsoftplus)")
        n_expert = self.need_int("expert_count")
        used = self.need_int("expert_used_count")
        if not 0 < used <= n_expert <= MAX_EXPERTS:
            raise self.fail(f"expert_used_count {used} / expert_count {n_expert} out of range")
        self.need(f"{ARCH}.swiglu_clamp_exp")  # the shared-expert clamp is optional
        for key in ("swiglu_clamp_exp", "swiglu_clamp_shexp"):
            value = self.get(f"{ARCH}.{key}")
            if isinstance(value, list) and len(value) != n_layer:
                raise self.fail(f"{ARCH}.{key} has {len(value)} entries; expected block_count = {n_layer}")

    def _check_ratios(self, n_layer: int) -> list[int]:
        ratios = self.need_ints("attention.compress_ratios")
        if len(ratios) < n_layer:
            raise self.fail(f"{ARCH}.attention.compress_ratios must be an array of at least block_count = {n_layer}")
        ratios = ratios[:n_layer]
        if bad := sorted({r for r in ratios if r not in ALLOWED_RATIOS}):
            raise self.fail(f"{ARCH}.attention.compress_ratios contains {bad}; only 0, 4 and 128 are supported")
        # A cache with zero layers crashes llama.cpp with SIGFPE at context creation (docs/formats.md).
        if 4 not in ratios:
            raise self.fail(f"{ARCH}.attention.compress_ratios has no ratio-4 layer")
        same_dim = self.need_int("attention.key_length") == self.need_int("attention.indexer.key_length")
        if same_dim and 128 not in ratios:
            raise self.fail(f"{ARCH}.attention.compress_ratios has no ratio-128 layer")
        return ratios

    def _check_tokens(self) -> list[str]:
        tokens = self.need("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise self.fail("tokenizer.ggml.tokens must be a non-empty array of strings")
        if len(set(tokens)) != len(tokens):
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise self.fail(f"tokenizer.ggml.tokens has duplicate token string {dup!r}")
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            if not 0 <= self.need_int(key, default=0, full=True) < len(tokens):
                raise self.fail(f"{key} is outside the vocabulary of {len(tokens)} tokens")
        return tokens

    def _check_tensors(self, n_layer: int, ratios: list[int]) -> int:
        """Check the tensor names against the layout; returns the number of MTP layers."""
        present = set(self.tensor_names)
        n_hash = self.need_int("hash_layer_count")
        if not 0 <= n_hash <= n_layer:
            raise self.fail(f"{ARCH}.hash_layer_count {n_hash} is outside 0..block_count ({n_layer})")
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
        n_nextn = self.get(f"{ARCH}.nextn_predict_layers", 0)
        first = n_layer - n_nextn if isinstance(n_nextn, int) and 0 < n_nextn < n_layer else n_layer
        return range(first, n_layer) if f"blk.{first}.nextn.eh_proj.weight" in present else range(0)


def _uniform(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value and len(set(value)) == 1 else value


def _tolerated_extra(name: str, n_layer: int) -> bool:
    """Generic scales, the Vision-Exp bias and layers past block_count load without complaint."""
    if _TOLERATED_EXTRA.match(name) or name.endswith(".exp_probs_b_vl.bias"):
        return True
    mtp = _LAYER.match(name)
    return mtp is not None and int(mtp.group(1)) >= n_layer
