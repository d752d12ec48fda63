"""`dsv4 serve` against the real OpenAI client: one keyed llama-server on the tiny model for the whole module.

The engine comes from the engine cache (`make setup` builds it; the fixture builds it if it is missing).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tiny_server import tiny_server

openai = pytest.importorskip("openai")

KEY = "test-key-123"
ALIAS = "tiny"
DSML = "｜DSML｜"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


@pytest.fixture(scope="module")
def server(engine, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with tiny_server(engine, tiny_gguf, tmp_path_factory.mktemp("serve-home"), api_key=KEY, alias=ALIAS) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _post(server, path: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(
        server.base_url + path,
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_models_lists_the_alias(client) -> None:
    assert [m.id for m in client.models.list().data] == [ALIAS]


def test_chat_completion(client) -> None:
    reply = client.chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.prompt_tokens > 0


def test_streaming_matches_non_streaming(client) -> None:
    kwargs = {"model": ALIAS, "messages": [{"role": "user", "content": "Count"}], "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole  # greedy: the same tokens either way
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_second_turn_reuses_the_cached_prompt(client) -> None:
    messages = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "First question"}]
    first = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=4, temperature=0)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "Second question"},
    ]
    second = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=4, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 4  # the first turn's prompt is not prefilled again
    assert cached < second.usage.prompt_tokens


def test_four_concurrent_requests_are_all_answered(client) -> None:
    def ask(i: int):
        return client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": f"Request {i}"}], max_tokens=6, temperature=0
        )

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, range(4)))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert all(r.usage.completion_tokens > 0 for r in replies)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    ],
)
def test_malformed_requests_get_400(server, body: dict) -> None:
    status, reply = _post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400, reply
    assert reply["error"]["message"]


def test_unknown_role_is_a_bad_request_for_the_client(client) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=ALIAS, messages=[{"role": "nobody", "content": 3}], max_tokens=4)


def test_unparseable_body_is_refused_and_the_server_goes_on(server, client) -> None:
    status, reply = _post(server, "/v1/chat/completions", b"{not json")
    assert status >= 400 and "parse error" in reply["error"]["message"]  # llama-server answers 500 here
    assert client.models.list().data


def test_wrong_key_gets_401(server) -> None:
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, _ = _post(server, "/v1/chat/completions", b'{"messages": []}', key="wrong")
    assert status == 401


def test_thinking_goes_to_reasoning_content(client) -> None:
    reply = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": "Think first"}],
        max_tokens=8,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    message = reply.choices[0].message.model_dump()
    assert message.get("reasoning_content"), message  # the random model never closes </think>: all reasoning


def test_tool_schema_is_in_the_rendered_prompt(server) -> None:
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER_TOOL]}
    status, rendered = _post(server, "/apply-template", json.dumps(body).encode())
    assert status == 200, rendered
    prompt = rendered["prompt"]
    assert '"name": "get_weather"' in prompt or '"name":"get_weather"' in prompt
    assert f"<{DSML}tool_calls>" in prompt  # V4's tool-call instructions
    assert prompt.endswith("<｜Assistant｜></think>")


def test_v4_tool_call_comes_back_as_tool_calls(client) -> None:
    # The random tiny model never writes a tool call, so the call is written for it in V4's DSML format as an
    # assistant prefill; llama-server's V4 grammar then only lets it end, and its V4 parser must turn the text
    # into OpenAI `tool_calls` with typed arguments (`string="false"` values are JSON).
    call = (
        f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="get_weather">\n'
        f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
        f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>\n'
        f"</{DSML}invoke>\n</{DSML}tool_calls>"
    )
    reply = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": call}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=16,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris", "days": 3}
    assert not choice.message.content


def test_tool_results_go_back_in_v4_format(server) -> None:
    arguments = json.dumps({"city": "Paris", "days": 3})
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ]
    status, rendered = _post(
        server, "/apply-template", json.dumps({"messages": messages, "tools": [WEATHER_TOOL]}).encode()
    )
    assert status == 200, rendered
    prompt = rendered["prompt"]
    assert f'<{DSML}invoke name="get_weather">' in prompt
    assert f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>' in prompt
    assert "<tool_result>sunny, 21 C</tool_result>" in prompt
