"""Conversations every DeepSeek V4 prompt path must render exactly as DeepSeek's encoder does (`dsv4_encoding`).

Each case is an OpenAI-style request: messages, request-level tools, thinking on or off, reasoning effort.
Tool schemas list name, description and parameters in that order (llama-server rebuilds them so).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str
    messages: list[dict[str, Any]]
    thinking: bool = False
    tools: list[dict[str, Any]] = field(default_factory=list)
    reasoning_effort: str | None = None


def _tool(name: str, description: str, **properties: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {k: {"type": v} for k, v in properties.items()},
                "required": list(properties),
            },
        },
    }


WEATHER = _tool("get_weather", "Weather forecast for a city", city="string", days="integer")
SEARCH = _tool("search", "Search the web", query="string", limit="integer", filters="object")
CLOCK = _tool("now", "The current time in a time zone", zone="string")
TOOLS = [WEATHER, SEARCH, CLOCK]


def _call(call_id: str, name: str, **args: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _result(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _u(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _a(text: str, reasoning: str | None = None, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    if calls:
        m["tool_calls"] = calls
    return m


SYS = {"role": "system", "content": "You are a careful assistant."}
TWO_CALLS = [_call("c1", "get_weather", city="Paris", days=2), _call("c2", "now", zone="Europe/Paris")]
THREE_CALLS = [*TWO_CALLS, _call("c3", "search", query="rain gear", limit=3, filters={"lang": "fr", "new": True})]
HISTORY = [_u("Hi"), _a("Hello! How can I help?", "The user greets me."), _u("What is 2+2?")]

CASES: list[Case] = [
    Case("single user", [_u("Hello")]),
    Case("single user thinking", [_u("Hello")], thinking=True),
    Case("system and user", [SYS, _u("Hello")]),
    Case("system and user thinking", [SYS, _u("Hello")], thinking=True),
    Case("two system messages", [SYS, {"role": "system", "content": "Answer in French."}, _u("Hello")]),
    Case("empty user", [_u("")]),
    Case("multi-turn", [SYS, *HISTORY]),
    Case("multi-turn thinking drops past reasoning", [SYS, *HISTORY], thinking=True),
    Case(
        "three turns thinking",
        [*HISTORY, _a("4", "Simple sum."), _u("And 3+3?")],
        thinking=True,
    ),
    Case("consecutive user messages", [_u("First part."), _u("Second part.")]),
    Case("history ending on assistant", [SYS, _u("Hi"), _a("Hello!")]),
    Case("history ending on assistant thinking", [_u("Hi"), _a("Hello!", "Greeting back.")], thinking=True),
    Case("unicode", [{"role": "system", "content": "Répondez en 日本語 🙂"}, _u("Ça va? ñ ß 中文 \u00e9\u0301 𝔘")]),
    Case("unicode thinking", [_u("Grüße 👋"), _a("こんにちは", "Denke… 🤔"), _u("再见")], thinking=True),
    Case("newlines and markup", [_u("line 1\n\nline 2\n<b>bold</b> & \"quotes\" 'single' \\ back\\slash\t tab")]),
    Case("tools declared, no calls", [_u("What's the weather in Paris?")], tools=[WEATHER]),
    Case("tools declared, thinking", [_u("What's the weather in Paris?")], tools=TOOLS, thinking=True),
    Case("tools with system", [SYS, _u("Weather?")], tools=TOOLS),
    Case("tools with system thinking", [SYS, _u("Weather?")], tools=TOOLS, thinking=True),
    Case(
        "one tool call round trip",
        [_u("Weather in Paris?"), _a("", calls=[TWO_CALLS[0]]), _result("c1", "Sunny, 24°C")],
        tools=[WEATHER],
    ),
    Case(
        "tool call round trip thinking keeps reasoning",
        [
            SYS,
            _u("Weather in Paris?"),
            _a("", "I should call the weather tool.", [TWO_CALLS[0]]),
            _result("c1", "Sunny, 24°C"),
        ],
        tools=TOOLS,
        thinking=True,
    ),
    Case(
        "two results in call order",
        [
            _u("Weather and time in Paris?"),
            _a("Checking.", calls=TWO_CALLS),
            _result("c1", "Sunny"),
            _result("c2", "14:05"),
        ],
        tools=TOOLS,
    ),
    Case(
        "two results out of order",
        [_u("Weather and time in Paris?"), _a("", calls=TWO_CALLS), _result("c2", "14:05"), _result("c1", "Sunny")],
        tools=TOOLS,
    ),
    Case(
        "three results out of order thinking",
        [
            _u("Plan my day in Paris."),
            _a("", "Three tools at once.", THREE_CALLS),
            _result("c3", '[{"title": "Raincoat"}]'),
            _result("c1", "Rain"),
            _result("c2", "08:00"),
        ],
        tools=TOOLS,
        thinking=True,
    ),
    Case(
        "results then a user message in the same turn",
        [_u("Weather?"), _a("", calls=TWO_CALLS), _result("c2", "noon"), _result("c1", "fog"), _u("Be brief.")],
        tools=TOOLS,
    ),
    Case(
        "tool loop then final answer and new question",
        [
            SYS,
            _u("Weather in Paris?"),
            _a("", "Need the tool.", [TWO_CALLS[0]]),
            _result("c1", "Sunny"),
            _a("It is sunny in Paris.", "Report it."),
            _u("And tomorrow?"),
        ],
        tools=TOOLS,
        thinking=True,
    ),
    Case(
        "tool loop without declared tools thinking drops reasoning",
        [_u("Weather?"), _a("", "Call it.", [TWO_CALLS[0]]), _result("c1", "Sunny")],
        thinking=True,
    ),
    Case(
        "tool loop, non-thinking, later turn",
        [
            _u("Weather?"),
            _a("", calls=[TWO_CALLS[0]]),
            _result("c1", "Sunny"),
            _a("Sunny."),
            _u("Thanks!"),
        ],
        tools=[WEATHER],
    ),
    Case(
        "call with no arguments and unicode arguments",
        [
            _u("Time and search"),
            _a("", calls=[_call("n1", "now"), _call("n2", "search", query="café ☕", limit=2, filters={"q": "ü"})]),
            _result("n1", "09:00"),
            _result("n2", "nothing"),
        ],
        tools=TOOLS,
    ),
    Case(
        "arguments with nested values",
        [
            _u("Search"),
            _a("", calls=[_call("s1", "search", query='a "quoted"\nline', limit=None, filters={"a": [1, 2.5, False]})]),
            _result("s1", "ok"),
        ],
        tools=TOOLS,
    ),
    Case("effort max thinking", [_u("Prove it.")], thinking=True, reasoning_effort="max"),
    Case("effort max with system thinking", [SYS, _u("Prove it.")], thinking=True, reasoning_effort="max"),
    Case("effort max with tools thinking", [_u("Prove it.")], tools=[CLOCK], thinking=True, reasoning_effort="max"),
    Case("effort max without thinking adds nothing", [SYS, _u("Prove it.")], reasoning_effort="max"),
    Case("effort high adds nothing", [SYS, *HISTORY], thinking=True, reasoning_effort="high"),
    Case(
        "results in a turn without an earlier call",
        [_u("Here are results"), _result("x9", "orphan"), _result("x8", "second")],
        tools=[WEATHER],
    ),
    Case(
        "second call round replaces the call order",
        [
            _u("Go"),
            _a("", calls=TWO_CALLS),
            _result("c2", "t"),
            _result("c1", "w"),
            _a("", calls=[_call("d1", "now", zone="UTC"), _call("d2", "get_weather", city="Oslo", days=1)]),
            _result("d2", "snow"),
            _result("d1", "noon"),
        ],
        tools=TOOLS,
        thinking=True,
    ),
    Case("assistant content with think markers kept as sent", [_u("a"), _a("x</think>y"), _u("b")]),
]
