"""tokenizer.json -> the gpt2 (byte-level BPE) vocabulary keys of a deepseek4 GGUF (docs/formats.md §Chat format).

llama.cpp asserts on duplicate token strings, so ids the tokenizer does not define are padded with unique
`[PAD{i}]` strings of type UNUSED up to the config's vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType

from quant.errors import CheckpointError
from quant.mapping import KeyValue
from quant.safetensors import load_json

NORMAL, CONTROL, UNUSED = 1, 3, 5  # llama.cpp token types
# llama.cpp's name for the V4 pre-tokenizer regexes (src/llama-vocab.cpp has it; deepseek-v3 selects the same).
PRE_TOKENIZER = "joyai-llm"
TEMPLATE_PATH = Path(__file__).with_name("deepseek_v4.jinja")


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int
    chat_template: str

    def metadata(self) -> list[KeyValue]:
        """Tokenizer keys with their exact GGUF types (token_type must be i32, ids u32)."""
        V = GGUFValueType
        return [
            ("tokenizer.ggml.model", "gpt2", V.STRING, None),
            ("tokenizer.ggml.pre", PRE_TOKENIZER, V.STRING, None),
            ("tokenizer.ggml.tokens", self.tokens, V.ARRAY, V.STRING),
            ("tokenizer.ggml.token_type", self.token_types, V.ARRAY, V.INT32),
            ("tokenizer.ggml.merges", self.merges, V.ARRAY, V.STRING),
            ("tokenizer.ggml.bos_token_id", self.bos_id, V.UINT32, None),
            ("tokenizer.ggml.eos_token_id", self.eos_id, V.UINT32, None),
            ("tokenizer.ggml.padding_token_id", self.pad_id, V.UINT32, None),
            ("tokenizer.ggml.add_bos_token", False, V.BOOL, None),
            ("tokenizer.ggml.add_eos_token", False, V.BOOL, None),
            ("tokenizer.chat_template", self.chat_template, V.STRING, None),
        ]


def _token_id(value: Any, ids: dict[str, int], default: int) -> int:
    if isinstance(value, dict):
        value = value.get("content")
    return ids.get(value, default) if isinstance(value, str) else default


def load_vocab(folder: Path, config: dict[str, Any]) -> Vocab:
    """Read tokenizer.json (+ tokenizer_config.json when present) of a checkpoint folder."""
    path = folder / "tokenizer.json"
    data = load_json(path, "tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(
            f"{path}: expected a byte-level BPE model with a vocab", hint="is this a DeepSeek V4 tokenizer?"
        )
    ids: dict[str, int] = dict(model["vocab"])
    special = set()
    for added in data.get("added_tokens") or []:
        ids[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    text = config.get("text_config", config)
    size = max(int(text.get("vocab_size", 0)), max(ids.values()) + 1)
    tokens: list[str | None] = [None] * size
    for token, i in ids.items():
        tokens[i] = token
    taken = set(ids)
    types = []
    for i, token in enumerate(tokens):
        if token is None:
            pad = f"[PAD{i}]"
            while pad in taken:
                pad = "_" + pad
            tokens[i], token = pad, pad
            types.append(UNUSED)
        else:
            types.append(CONTROL if i in special else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = load_json(tok_config_path, "tokenizer_config.json") if tok_config_path.is_file() else {}
    bos = int(config.get("bos_token_id", _token_id(tok_config.get("bos_token"), ids, 0)))
    eos = int(config.get("eos_token_id", _token_id(tok_config.get("eos_token"), ids, 1)))
    template = tok_config.get("chat_template")
    if not isinstance(template, str) and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(template, str):
        template = TEMPLATE_PATH.read_text(encoding="utf-8")
    return Vocab(
        tokens=[t for t in tokens if t is not None],
        token_types=types,
        merges=merges,
        bos_id=bos,
        eos_id=eos,
        pad_id=_token_id(tok_config.get("pad_token"), ids, eos),
        chat_template=template,
    )
