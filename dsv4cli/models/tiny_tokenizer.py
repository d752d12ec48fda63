"""A small byte-level BPE tokenizer in the DeepSeek V4 `tokenizer.json` format, for the built-in tiny models.

Same structure as the official file (byte-level BPE, the three DeepSeek pre-tokenizer regexes, special tokens at
ids 0-2 plus the chat/tool/thinking markers), so `dsv4 quantize` and llama.cpp see a realistic tokenizer; merges are
learnt deterministically from a short built-in English text to fill exactly `vocab_size` ids.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter
from typing import Any

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
# Chat, thinking, FIM and tool markers (docs/formats.md §Chat format); `<|EOT|>` really uses ASCII bars.
TAIL_SPECIALS = (
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜System｜>",
    "<think>",
    "</think>",
    "<｜fim▁hole｜>",
    "<｜fim▁begin｜>",
    "<｜fim▁end｜>",
    "<|EOT|>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
    "｜DSML｜",
)
# The DeepSeek V3/V4/V4.1 pre-tokenizer (docs/formats.md §Chat format), in the order the official file applies them.
SPLIT_PATTERNS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# ASCII approximation of SPLIT_PATTERNS for training on the ASCII corpus below (`re` has no \p{...}).
TRAIN_PATTERN = re.compile(r"\d{1,3}| ?[A-Za-z]+| ?[^\sA-Za-z\d]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = """\
The quick brown fox jumps over the lazy dog. A model that runs on one machine has to be small enough to fit,
and the tiny model is made for tests: it has the same layout as the real one, but every matrix is only a few
hundred numbers wide. When you ask the assistant a question, the user turn and the answer are written with
special tokens, and the model thinks before it answers. Hello, world! How are you today? I am fine, thank you.
This is a test of the tokenizer, with numbers like 2026, 128 and 4096, and with words that come back again and
again: the, and, of, to, in, is, that, it, for, with, as, on, be, at, by, this, have, from, or, one, had, not,
but, what, all, were, when, we, there, can, an, your, which, their, said, if, do, will, each, about, how, up,
out, them, then, she, many, some, so, these, would, other, into, has, more, her, two, like, him, see, time.
Experts in a mixture of experts are small networks; a router picks a few of them for every token, and the
weights of each expert are stored in four bits with a scale for every block of thirty two values. The rest of
the weights are stored in eight bits, and the norms stay in sixteen bits. Running the model means reading the
weights from disk, putting the dense part on the graphics card and the experts in main memory, and then
generating one token after another until the end of the sentence.
Once upon a time there was a little village by the sea. The people of the village were fishermen, and every
morning they went out in their boats to catch fish. In the evening they came back, and the children ran down to
the beach to meet them. The old man who lived in the house on the hill watched them every day and wrote down
what he saw in a thick book with a green cover. Nobody knew why he did it, but everybody liked him.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


@functools.cache
def learn_merges(text: str, count: int, known: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """Classic BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    byte_chars = bytes_to_unicode()
    words = Counter(tuple(byte_chars[b] for b in piece.encode("utf-8")) for piece in TRAIN_PATTERN.findall(text))
    vocab = set(known)
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for pair in itertools.pairwise(word):
                if pair[0] + pair[1] not in vocab:
                    pairs[pair] += freq
        if not pairs:
            raise ValueError(f"the built-in corpus yields only {len(merges)} merges, {count} needed")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.add(best[0] + best[1])
        words = Counter({_merge_word(word, best): freq for word, freq in words.items()})
    return tuple(merges)


def _added(token_id: int, content: str) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def tokenizer_json(vocab_size: int) -> dict[str, Any]:
    """The tokenizer.json document with exactly `vocab_size` ids: 3 specials, 256 bytes, merges, tail specials."""
    byte_tokens = list(bytes_to_unicode().values())
    head = [BOS, EOS, PAD]
    n_merges = vocab_size - len(head) - len(byte_tokens) - len(TAIL_SPECIALS)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small for the byte alphabet and special tokens")
    merges = learn_merges(CORPUS, n_merges, frozenset(byte_tokens))
    tokens = head + byte_tokens + [a + b for a, b in merges] + list(TAIL_SPECIALS)
    specials = {**dict.fromkeys(head), **dict.fromkeys(TAIL_SPECIALS)}
    pre_tokenizers: list[dict[str, Any]] = [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
        for pattern in SPLIT_PATTERNS
    ]
    pre_tokenizers.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added(i, t) for i, t in enumerate(tokens) if t in specials],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json as the official repos ship it: no chat template, pad = EOS, no automatic BOS."""
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": EOS,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
        "use_default_system_prompt": False,
    }


def tokenizer_files(vocab_size: int, *, model_max_length: int) -> dict[str, dict[str, Any]]:
    """File name -> JSON document for the tokenizer files of a tiny checkpoint."""
    return {"tokenizer.json": tokenizer_json(vocab_size), "tokenizer_config.json": tokenizer_config(model_max_length)}
