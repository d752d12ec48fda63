"""The APIs coding agents speak, through `dsv4 serve`, with the official clients: Anthropic Messages (`/v1/messages`,
the `anthropic` package, as Claude Code uses it) and OpenAI Responses (`/v1/responses`, as Codex uses it).

Two keyed llama-servers on the tiny model: thinking off (`dsv4 serve`'s default) and on (`--think`); the random
model never closes `</think>`, so with thinking on its whole output is reasoning. The model cannot write a tool
call by itself, so the call is given as the assistant's prefill in DeepSeek's DSML (the encoder's own rendering):
the V4 grammar then lets it end, and the server answers with the call in each API's own shape.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dsv4_encoding import encode, render_tool_calls
from tiny_server import tiny_server

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

KEY = "agent-key-7"
GREEDY = {"temperature": 0}  # the anthropic client has no temperature argument any more; llama-server reads it
ALIAS = "tiny"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "Weather forecast for a city", "input_schema": WEATHER_SCHEMA}
RESPONSES_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather forecast for a city",
    "parameters": WEATHER_SCHEMA,
}
OPENAI_TOOL = {"type": "function", "function": {k: v for k, v in RESPONSES_TOOL.items() if k != "type"}}
CALL_ARGS = {"city": "Paris", "days": 3}
DSML_CALL = render_tool_calls(
    [{"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(CALL_ARGS)}}]
)


def _serve(engine, tiny_gguf: Path, home: Path, *, think: bool) -> Iterator:
    with tiny_server(engine, tiny_gguf, home, api_key=KEY, alias=ALIAS, think=think) as running:
        yield running


@pytest.fixture(scope="module")
def server(engine, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    yield from _serve(engine, tiny_gguf, tmp_path_factory.mktemp("agents-home"), think=False)


@pytest.fixture(scope="module")
def thinking_server(engine, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    yield from _serve(engine, tiny_gguf, tmp_path_factory.mktemp("agents-think-home"), think=True)


def _claude(server, key: str = KEY):
    return anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def _codex(server, key: str = KEY):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def _token_count(server, text: str) -> int:
    body = json.dumps({"content": text, "add_special": False, "parse_special": True}).encode()
    request = urllib.request.Request(
        server.base_url + "/tokenize",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        return len(json.loads(r.read())["tokens"])


def _prompt_tokens(usage) -> int:
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)  # Anthropic counts cached tokens apart


def _encoded_round_trip(question: dict, call_id: str, arguments: str) -> str:
    """DeepSeek's encoding of: question, the get_weather call, its result."""
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [
        {"role": "user", "content": question["content"]},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": "Sunny, 24°C"},
    ]
    return encode(messages, thinking=False, tools=[OPENAI_TOOL])


# Anthropic Messages


def test_anthropic_plain_and_streaming_agree(server) -> None:
    client = _claude(server)
    kwargs = {"model": ALIAS, "max_tokens": 8, "extra_body": GREEDY, "messages": [{"role": "user", "content": "Hello"}]}
    reply = client.messages.create(**kwargs)
    assert reply.role == "assistant" and reply.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in reply.content] == ["text"] and reply.usage.output_tokens > 0
    with client.messages.stream(**kwargs) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == reply.content[0].text == final.content[0].text  # greedy: the same tokens either way


def test_anthropic_tool_use_round_trip(server) -> None:
    client = _claude(server)
    question = {"role": "user", "content": "Weather in Paris for 3 days?"}
    reply = client.messages.create(
        model=ALIAS,
        max_tokens=16,
        extra_body=GREEDY,
        tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "any"},
        messages=[question, {"role": "assistant", "content": DSML_CALL}],
    )
    assert reply.stop_reason == "tool_use", reply
    (use,) = [b for b in reply.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == CALL_ARGS and use.id

    messages = [
        question,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24°C"}]},
    ]
    answer = client.messages.create(
        model=ALIAS, max_tokens=8, extra_body=GREEDY, tools=[ANTHROPIC_TOOL], messages=messages
    )

    assert answer.content and _prompt_tokens(answer.usage) > _prompt_tokens(reply.usage)
    # the prompt the round trip was answered from is DeepSeek's encoding of the same conversation
    counted = client.messages.count_tokens(model=ALIAS, tools=[ANTHROPIC_TOOL], messages=messages).input_tokens
    expected = _encoded_round_trip(question, use.id, json.dumps(use.input))
    assert counted == _token_count(server, expected)


def test_anthropic_thinking_blocks(thinking_server) -> None:
    client = _claude(thinking_server)
    kwargs = {
        "model": ALIAS,
        "max_tokens": 8,
        "extra_body": GREEDY,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "Think first"}],
    }
    reply = client.messages.create(**kwargs)
    assert reply.content[0].type == "thinking" and reply.content[0].thinking
    with client.messages.stream(**kwargs) as stream:
        kinds = {e.delta.type for e in stream if e.type == "content_block_delta"}
        final = stream.get_final_message()
    assert "thinking_delta" in kinds and final.content[0].thinking == reply.content[0].thinking


def test_anthropic_wrong_key_is_refused(server) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        _claude(server, key="wrong").messages.create(
            model=ALIAS, max_tokens=4, messages=[{"role": "user", "content": "Hello"}]
        )


# OpenAI Responses


def test_responses_plain_and_streaming_agree(server) -> None:
    client = _codex(server)
    kwargs = {"model": ALIAS, "input": "Hello", "max_output_tokens": 8, "temperature": 0}
    reply = client.responses.create(**kwargs)
    assert reply.status == "completed" and reply.output_text and reply.usage.output_tokens > 0
    events = list(client.responses.create(**kwargs, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.completed" and deltas == reply.output_text


def test_responses_function_call_round_trip(server) -> None:
    client = _codex(server)
    question = {"type": "message", "role": "user", "content": "Weather in Paris for 3 days?"}
    reply = client.responses.create(
        model=ALIAS,
        input=[question, {"type": "message", "role": "assistant", "content": DSML_CALL}],
        tools=[RESPONSES_TOOL],
        tool_choice="required",
        max_output_tokens=16,
        temperature=0,
    )
    (call,) = [o for o in reply.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == CALL_ARGS and call.call_id

    followup = [
        question,
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24°C"},
    ]
    answer = client.responses.create(
        model=ALIAS, input=followup, tools=[RESPONSES_TOOL], max_output_tokens=8, temperature=0
    )
    assert answer.status == "completed" and answer.usage.input_tokens > reply.usage.input_tokens
    counted = client.responses.input_tokens.count(model=ALIAS, input=followup, tools=[RESPONSES_TOOL]).input_tokens
    assert counted == _token_count(server, _encoded_round_trip(question, call.call_id, call.arguments))


def test_responses_reasoning_items(thinking_server) -> None:
    client = _codex(thinking_server)
    reply = client.responses.create(
        model=ALIAS, input="Think first", reasoning={"effort": "high"}, max_output_tokens=8, temperature=0
    )
    reasoning = [o for o in reply.output if o.type == "reasoning"]
    assert reasoning, reply.output
    events = list(
        client.responses.create(model=ALIAS, input="Think first", max_output_tokens=8, temperature=0, stream=True)
    )
    assert any("reasoning" in e.type and e.type.endswith(".delta") for e in events), {e.type for e in events}


def test_responses_wrong_key_is_refused(server) -> None:
    with pytest.raises(openai.AuthenticationError):
        _codex(server, key="wrong").responses.create(model=ALIAS, input="Hello", max_output_tokens=4)
