"""Every prompt path renders the conversation corpus byte for byte as DeepSeek's V4 encoder does, and llama-server
reads V4 output (reasoning, DSML tool calls) as DeepSeek's parser does.

The reference is `dsv4_encoding` (re-derived from DeepSeek's encoding_dsv4.py); the paths are the template that
`quantize` embeds rendered by chat's sandboxed jinja2 (and chat's `PromptRenderer`), and `dsv4 serve`'s
llama-server (its /apply-template endpoint renders exactly what a chat request would be prompted with).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dsv4_encoding import BOS, EOS, encode, parse_completion, render_tool_calls
from prompt_corpus import CASES, TOOLS, WEATHER, Case
from tiny_server import tiny_server

from dsv4cli.chat.prompt import PromptRenderer, ReasoningSplitter
from dsv4cli.chat.template_sandbox import TemplateSandbox
from quant.tokenizer import TEMPLATE_PATH

IDS = [c.name for c in CASES]


def _expected(case: Case) -> str:
    return encode(
        case.messages, thinking=case.thinking, tools=case.tools or None, reasoning_effort=case.reasoning_effort
    )


def test_corpus_is_broad() -> None:
    assert len(CASES) >= 30
    assert any(c.thinking and c.tools for c in CASES) and any(c.tools and not c.thinking for c in CASES)
    assert any(c.reasoning_effort == "max" for c in CASES)
    assert sum(sum(m["role"] == "tool" for m in c.messages) > 1 for c in CASES) >= 4


def test_reference_matches_deepseeks_documented_shapes() -> None:
    # Hand-written from DeepSeek's encoder behaviour, so the reference itself is pinned, not only compared.
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "reasoning_content": "r"}]
    assert encode([*history, {"role": "user", "content": "Q"}], thinking=True) == (
        f"{BOS}<｜User｜>Hi<｜Assistant｜></think>Yo{EOS}<｜User｜>Q<｜Assistant｜><think>"
    )
    assert encode([*history, {"role": "user", "content": "Q"}], thinking=True, tools=[WEATHER]).endswith(
        f"<｜User｜>Hi<｜Assistant｜><think>r</think>Yo{EOS}<｜User｜>Q<｜Assistant｜><think>"
    )
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
    ]
    results = [
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
    ]
    text = encode(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": calls}, *results],
        thinking=False,
    )
    assert text.endswith(
        '<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n<｜DSML｜invoke name="g">\n'
        '<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
        f"{EOS}<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B</tool_result><｜Assistant｜></think>"
    )
    assert encode([{"role": "user", "content": "Q"}], thinking=True, reasoning_effort="max").startswith(
        BOS + "Reasoning Effort: Absolute maximum"
    )


@pytest.fixture(scope="module")
def sandbox() -> Iterator[TemplateSandbox]:
    template = TemplateSandbox(TEMPLATE_PATH.read_text(encoding="utf-8"))
    yield template
    template.close()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chat_template_matches_encoder(sandbox: TemplateSandbox, case: Case) -> None:
    variables = {"tools": case.tools} if case.tools else {}
    if case.reasoning_effort:
        variables["reasoning_effort"] = case.reasoning_effort
    rendered = sandbox.render(
        messages=case.messages,
        add_generation_prompt=True,
        thinking=case.thinking,
        bos_token=BOS,
        eos_token=EOS,
        **variables,
    )
    assert rendered == _expected(case)


def test_chat_renderer_matches_encoder() -> None:
    """The REPL's own renderer (no tools, no effort: the REPL sends neither) on the corpus's plain conversations."""
    renderer = PromptRenderer(TEMPLATE_PATH.read_text(encoding="utf-8"), bos_token=BOS, eos_token=EOS)
    try:
        plain = [c for c in CASES if not c.tools and not c.reasoning_effort and c.messages[-1]["role"] == "user"]
        plain = [c for c in plain if all(m["role"] != "tool" for m in c.messages)]
        assert len(plain) >= 10
        for case in plain:
            assert renderer.render(case.messages, thinking=case.thinking).text == _expected(case), case.name
    finally:
        renderer.close()


COMPLETIONS = [
    (False, "Plain answer, ünïcode ✓."),
    (True, "First I think.\nThen more.</think>The answer is 4."),
    (True, "</think>No thoughts."),
    (True, "Reasoning with </thin and <think> look-alikes</think>Answer with </think> in it."),
]


@pytest.mark.parametrize(("thinking", "text"), COMPLETIONS)
def test_chat_splits_reasoning_as_deepseek_parses_it(thinking: bool, text: str) -> None:
    """The REPL's streaming splitter, fed one character at a time (markers split across chunks)."""
    pieces = list(ReasoningSplitter(thinking=thinking).split(text))
    reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
    answer = "".join(t for kind, t in pieces if kind == "answer")
    try:
        reference = parse_completion(text + EOS, thinking=thinking)
    except ValueError:  # DeepSeek's parser refuses special tokens in the text; the split point must still agree
        assert reasoning == text.partition("</think>")[0]
        return
    assert (reasoning, answer) == (reference["reasoning_content"], reference["content"])


@pytest.fixture(scope="module")
def server(engine, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with tiny_server(engine, tiny_gguf, tmp_path_factory.mktemp("encoding-home"), alias="tiny") as running:
        yield running


def _post(server, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        server.base_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def _request(case: Case) -> dict:
    body: dict = {"messages": case.messages, "chat_template_kwargs": {"enable_thinking": case.thinking}}
    if case.tools:
        body["tools"] = case.tools
    if case.reasoning_effort:
        body["reasoning_effort"] = case.reasoning_effort
    return body


def test_serve_prompts_match_encoder(server) -> None:
    """All cases through one server (a parametrized test would only repeat the fixture's lookups)."""
    wrong = []
    for case in CASES:
        expected = _expected(case)
        if case.messages[-1]["role"] == "assistant":  # llama-server continues a final assistant message: no EOS
            expected = expected.removesuffix(EOS)
        if _post(server, "/apply-template", _request(case))["prompt"] != expected:
            wrong.append(case.name)
    assert not wrong, wrong


def _calls(message: dict) -> list[tuple[str, object]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []]


def _same_message(served: dict, reference: dict) -> None:
    assert (served.get("content") or "") == reference["content"]
    assert (served.get("reasoning_content") or "") == reference["reasoning_content"]
    assert _calls(served) == _calls(reference)


@pytest.mark.parametrize(("thinking", "text"), COMPLETIONS[:3])
def test_serve_splits_reasoning_as_deepseek_parses_it(server, thinking: bool, text: str) -> None:
    """The model's whole output is forced by a grammar, so llama-server parses exactly this text."""
    body = {
        "messages": [{"role": "user", "content": "Q"}],
        "chat_template_kwargs": {"enable_thinking": thinking},
        "grammar": "root ::= " + json.dumps(text),
        "max_tokens": 64,
        "temperature": 0,
    }
    served = _post(server, "/v1/chat/completions", body)["choices"][0]["message"]
    _same_message(served, parse_completion(text + EOS, thinking=thinking))


CALL_SETS = {
    "one call": [("get_weather", {"city": "Paris", "days": 2})],
    "three calls, nested and unicode values": [
        ("get_weather", {"city": "Zürich", "days": 1}),
        ("now", {"zone": "Asia/Tokyo"}),
        ("search", {"query": 'café ☕ "best"', "limit": 3, "filters": {"lang": ["fr", "de"], "open": True}}),
    ],
}


@pytest.mark.parametrize("thinking", [False, True], ids=["chat", "thinking"])
@pytest.mark.parametrize("calls", list(CALL_SETS.values()), ids=list(CALL_SETS))
def test_serve_reads_dsml_tool_calls_as_deepseek_parses_them(server, calls: list, thinking: bool) -> None:
    """The tool-call text is the encoder's own rendering, given as the assistant's prefill (the random tiny model
    never writes one); the V4 grammar then only lets it end, and llama-server parses prefill and all."""
    openai_calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(calls)
    ]
    content, reasoning = "Let me check.", "The user wants data; call the tools."
    block = render_tool_calls(openai_calls)
    prefill = {"role": "assistant", "content": content + block}
    if thinking:
        prefill["reasoning_content"] = reasoning
    body = {
        "messages": [{"role": "user", "content": "Q"}, prefill],
        "tools": TOOLS,
        "tool_choice": "required",
        "chat_template_kwargs": {"enable_thinking": thinking},
        "max_tokens": 16,
        "temperature": 0,
    }
    served = _post(server, "/v1/chat/completions", body)["choices"][0]
    assert served["finish_reason"] == "tool_calls"
    completion = (reasoning + "</think>" if thinking else "") + content + block + EOS
    reference = parse_completion(completion, thinking=thinking)
    assert _calls(reference) == calls
    _same_message(served["message"], reference)
