"""Vocabulary keys from tokenizer.json and the chat template we embed when a checkpoint ships none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest

from quant.tokenizer import CONTROL, NORMAL, TEMPLATE_PATH, UNUSED, load_vocab

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def render(messages: list[dict], **variables: object) -> str:
    template = jinja2.Environment().from_string(TEMPLATE_PATH.read_text(encoding="utf-8"))
    return template.render(messages=messages, bos_token=BOS, add_generation_prompt=True, **variables)


def test_vocab_padded_with_unique_unused_tokens(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += 7
    vocab = load_vocab(folder, config)
    assert len(vocab.tokens) == config["vocab_size"] == len(vocab.token_types)
    assert len(set(vocab.tokens)) == len(vocab.tokens)
    assert vocab.token_types[-7:] == [UNUSED] * 7 and vocab.tokens[-1] == f"[PAD{config['vocab_size'] - 1}]"
    data = json.loads((folder / "tokenizer.json").read_text())
    specials = {t["id"] for t in data["added_tokens"] if t.get("special")}
    assert all(vocab.token_types[i] == CONTROL for i in specials)
    assert all(vocab.token_types[i] == NORMAL for i in set(data["model"]["vocab"].values()) - specials)
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id) == (0, 1, 1)
    assert len(vocab.merges) == len(data["model"]["merges"]) and all(" " in m for m in vocab.merges)
    assert vocab.chat_template == TEMPLATE_PATH.read_text(encoding="utf-8")  # the tiny checkpoint ships none


def test_template_non_thinking_and_history() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "ponder"},
        {"role": "user", "content": "Again"},
    ]
    assert render(messages) == (
        f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜></think>Hello{EOS}<｜User｜>Again<｜Assistant｜></think>"
    )


@pytest.mark.parametrize("flag", ["thinking", "enable_thinking"])
def test_template_thinking_prompt(flag: str) -> None:
    text = render([{"role": "user", "content": "Q"}], **{flag: True})
    assert text == f"{BOS}<｜User｜>Q<｜Assistant｜><think>"


def test_template_tool_results_join_the_user_turn() -> None:
    text = render([{"role": "user", "content": "Q"}, {"role": "tool", "content": "42"}])
    assert text == f"{BOS}<｜User｜>Q\n\n<tool_result>42</tool_result><｜Assistant｜></think>"
