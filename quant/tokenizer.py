"""tokenizer.json -> the gpt2 (byte-level BPE) vocabulary keys of a deepseek4 GGUF (docs/formats.md §Chat format).

llama.cpp asserts on duplicate token strings, so ids the tokenizer does not define are padded with unique
`[PAD{i}]` strings of type UNUSED up to the config's vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType

from quant.config import facts_of
from quant.errors import CheckpointError
from quant.files import load_json_object, read_bounded, shown
from quant.gguf_keys import BOS_TOKEN_ID, CHAT_TEMPLATE, EOS_TOKEN_ID, MERGES, TOKENIZER_MODEL, TOKENIZER_PRE, TOKENS
from quant.mapping import KeyValue

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
            (TOKENIZER_MODEL, "gpt2", V.STRING, None),
            (TOKENIZER_PRE, PRE_TOKENIZER, V.STRING, None),
            (TOKENS, self.tokens, V.ARRAY, V.STRING),
            ("tokenizer.ggml.token_type", self.token_types, V.ARRAY, V.INT32),
            (MERGES, self.merges, V.ARRAY, V.STRING),
            (BOS_TOKEN_ID, self.bos_id, V.UINT32, None),
            (EOS_TOKEN_ID, self.eos_id, V.UINT32, None),
            ("tokenizer.ggml.padding_token_id", self.pad_id, V.UINT32, None),
            ("tokenizer.ggml.add_bos_token", False, V.BOOL, None),
            ("tokenizer.ggml.add_eos_token", False, V.BOOL, None),
            (CHAT_TEMPLATE, self.chat_template, V.STRING, None),
        ]


def _token_id(value: Any, ids: dict[str, int], default: int) -> int:
    if isinstance(value, dict):
        value = value.get("content")
    return ids.get(value, default) if isinstance(value, str) else default


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}", hint="use the tokenizer files shipped with the checkpoint")


def _ids(path: Path, data: dict[str, Any], vocab_size: int) -> tuple[dict[str, int], set[int], dict[str, Any]]:
    """token -> id (vocab plus added tokens), the special ids, and the model section; every id below vocab_size."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise _bad(path, "expected a byte-level BPE model with a vocab (is this a DeepSeek V4 tokenizer?)")
    if not model["vocab"]:
        raise _bad(path, "the vocabulary is empty")
    ids: dict[str, int] = {}
    owner: dict[int, str] = {}  # id -> its token: two different tokens may not share an id
    for token, i in model["vocab"].items():
        if type(i) is not int or not 0 <= i < vocab_size:
            raise _bad(path, f"token {shown(token, 40)} has id {shown(i, 40)}, outside the vocabulary of {vocab_size}")
        _claim(path, owner, token, i)
        ids[token] = i
    special = set()
    added_tokens = data.get("added_tokens") or []
    if not isinstance(added_tokens, list):
        raise _bad(path, "added_tokens must be a list")
    for added in added_tokens:
        if not isinstance(added, dict) or not isinstance(added.get("content"), str) or type(added.get("id")) is not int:
            raise _bad(path, f"added token {shown(added, 60)} needs a string content and an integer id")
        if not 0 <= added["id"] < vocab_size:
            raise _bad(path, f"added token {shown(added['content'], 40)} has id {added['id']}, outside {vocab_size}")
        _claim(path, owner, added["content"], added["id"])
        ids[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    return ids, special, model


def _claim(path: Path, owner: dict[int, str], token: str, i: int) -> None:
    """Record that `token` has id `i`; another token with the same id would be silently lost in the GGUF."""
    other = owner.setdefault(i, token)
    if other != token:
        raise _bad(path, f"tokens {shown(other, 40)} and {shown(token, 40)} both have id {i}")


def _merges(path: Path, model: dict[str, Any]) -> list[str]:
    merges = model.get("merges") or []
    if not isinstance(merges, list):
        raise _bad(path, "model.merges must be a list")
    out = []
    for m in merges:
        if isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append(" ".join(m))
        elif isinstance(m, str):
            out.append(m)
        else:
            raise _bad(path, f"merge {shown(m, 60)} is neither a string nor a pair of strings")
    return out


def load_vocab(folder: Path, config: dict[str, Any]) -> Vocab:
    """Read tokenizer.json (+ tokenizer_config.json when present) of a checkpoint folder; `config` must have
    passed `facts_of` (vocab_size and token ids are checked there)."""
    path = folder / "tokenizer.json"
    facts = facts_of(config)
    size = facts["vocab_size"]
    ids, special, model = _ids(path, load_json_object(path, "tokenizer.json"), size)
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
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = load_json_object(tok_config_path) if tok_config_path.exists() else {}
    bos = facts.get("bos_token_id", _token_id(tok_config.get("bos_token"), ids, 0))
    eos = facts.get("eos_token_id", _token_id(tok_config.get("eos_token"), ids, 1))
    template = tok_config.get("chat_template")
    template_path = folder / "chat_template.jinja"
    if not isinstance(template, str) and template_path.exists():
        template = read_bounded(template_path).decode("utf-8", "replace")
    if not isinstance(template, str):
        template = TEMPLATE_PATH.read_text(encoding="utf-8")
    return Vocab(
        tokens=[t for t in tokens if t is not None],
        token_types=types,
        merges=_merges(path, model),
        bos_id=bos,
        eos_id=eos,
        pad_id=_token_id(tok_config.get("pad_token"), ids, eos),
        chat_template=template,
    )
