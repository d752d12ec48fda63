"""DeepSeek V4's prompt encoder and output parser, re-derived for tests: the independent reference the chat template
is compared with byte for byte.

Written for this project from the behaviour of DeepSeek's `encoding/encoding_dsv4.py` (shipped with the V4
checkpoints, MIT licence); no code is copied from it. What it does, in the encoder's own order:
- `tool` messages and the user messages around them merge into one user turn, blocks joined by a blank line,
  each tool result as `<tool_result>...</tool_result>`, the results sorted into the call order of the last
  assistant message that made tool calls (matched by id; an unknown id sorts first);
- tools are rendered into a system message (request-level `tools` go on the first message when it is a system
  message, else on a new empty one at the front: `encode` below), JSON one line each;
- every user turn that an assistant turn follows (or that ends the prompt) closes with `<｜Assistant｜>` and
  `<think>` (thinking mode, current turn or past reasoning kept) or `</think>`;
- in thinking mode, past reasoning (assistant turns before the last user turn) is dropped unless tools are
  declared; kept reasoning renders as `reasoning</think>` at the start of the assistant turn;
- `reasoning_effort="max"` in thinking mode puts the effort preamble right after BOS; `high` (or none) adds nothing.
Not covered: `developer`, `latest_reminder` and task messages, `response_format`, content blocks (images).
"""

from __future__ import annotations

import json
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"

EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

TOOLS_HEADER = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f'"<{DSML}tool_calls>" block like the following:\n\n'
    f"<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete reasoning inside "
    f"{THINK}...{END_THINK} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {END_THINK} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_FOOTER = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"

Message = dict[str, Any]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def encode(
    messages: list[Message],
    *,
    thinking: bool,
    tools: list[dict[str, Any]] | None = None,
    reasoning_effort: str | None = None,
) -> str:
    """An OpenAI-style request (messages + request-level tools) as the prompt DeepSeek's encoder makes of it."""
    messages = [dict(m) for m in messages]
    if tools:
        if messages and messages[0]["role"] == "system":
            messages[0]["tools"] = tools
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": tools})
    return encode_messages(messages, thinking=thinking, reasoning_effort=reasoning_effort)


def encode_messages(messages: list[Message], *, thinking: bool, reasoning_effort: str | None = None) -> str:
    """The prompt for `messages`, tools attached to system messages as the encoder takes them."""
    if reasoning_effort not in (None, "high", "max"):
        raise ValueError(f"reasoning effort {reasoning_effort!r}")
    turns = _sort_results(_merge(messages))
    drop = not any(m.get("tools") for m in turns)  # declared tools keep all past reasoning
    if thinking and drop:
        last = _last_user(turns)
        turns = [m if i >= last or m["role"] != "assistant" else _without_reasoning(m) for i, m in enumerate(turns)]
    prompt = BOS
    if turns and thinking and reasoning_effort == "max":
        prompt += EFFORT_MAX
    for i in range(len(turns)):
        prompt += _render(i, turns, thinking=thinking, drop=drop)
    return prompt


def _without_reasoning(m: Message) -> Message:
    return {k: v for k, v in m.items() if k != "reasoning_content"}


def _merge(messages: list[Message]) -> list[Message]:
    """Runs of user and tool messages become one user turn of blocks."""
    out: list[Message] = []
    for m in messages:
        if m["role"] == "tool":
            block = {"type": "tool_result", "id": m.get("tool_call_id", ""), "text": m.get("content", "")}
        elif m["role"] == "user":
            block = {"type": "text", "text": m.get("content", "")}
        else:
            out.append(m)
            continue
        if out and out[-1]["role"] == "user":
            out[-1]["blocks"].append(block)
        else:
            out.append({"role": "user", "blocks": [block]})
    return out


def _sort_results(turns: list[Message]) -> list[Message]:
    """Tool results in the order of the calls of the last assistant turn that made calls (stable; unknown: 0)."""
    order: dict[str, int] = {}
    for m in turns:
        if m["role"] == "assistant" and m.get("tool_calls"):
            order = {c["id"]: i for i, c in enumerate(m["tool_calls"]) if c.get("id")}
        elif m["role"] == "user":
            results = [b for b in m["blocks"] if b["type"] == "tool_result"]
            ranked = iter(sorted(results, key=lambda b: order.get(b["id"], 0)))
            m["blocks"] = [next(ranked) if b["type"] == "tool_result" else b for b in m["blocks"]]
    return turns


def _last_user(turns: list[Message]) -> int:
    return max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)


def render_tools(tools: list[dict[str, Any]]) -> str:
    return TOOLS_HEADER + "\n".join(_json(t["function"]) for t in tools) + TOOLS_FOOTER


def _arguments(raw: Any) -> str:
    args = json.loads(raw) if isinstance(raw, str) else raw
    return "\n".join(
        f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
        f"{v if isinstance(v, str) else _json(v)}</{DSML}parameter>"
        for k, v in args.items()
    )


def render_tool_calls(calls: list[dict[str, Any]]) -> str:
    invokes = [
        f'<{DSML}invoke name="{c["function"]["name"]}">\n{_arguments(c["function"]["arguments"])}\n</{DSML}invoke>'
        for c in calls
    ]
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _render(i: int, turns: list[Message], *, thinking: bool, drop: bool) -> str:
    m = turns[i]
    last = _last_user(turns)
    if m["role"] == "system":
        text = m.get("content") or ""
        if m.get("tools"):
            text += "\n\n" + render_tools(m["tools"])
    elif m["role"] == "user":
        parts = [b["text"] if b["type"] == "text" else f"<tool_result>{b['text']}</tool_result>" for b in m["blocks"]]
        text = USER + "\n\n".join(parts)
    elif m["role"] == "assistant":
        reasoning = ""
        if thinking and (not drop or i > last):
            reasoning = (m.get("reasoning_content") or "") + END_THINK
        calls = render_tool_calls(m["tool_calls"]) if m.get("tool_calls") else ""
        text = reasoning + (m.get("content") or "") + calls + EOS
    else:
        raise ValueError(f"role {m['role']!r} is not covered by this reference")
    follows = turns[i + 1]["role"] if i + 1 < len(turns) else None
    if m["role"] == "user" and follows in (None, "assistant"):
        text += ASSISTANT + (THINK if thinking and (not drop or i >= last) else END_THINK)
    return text


def parse_completion(text: str, *, thinking: bool) -> Message:
    """The assistant message in a completion (text up to and including EOS), as DeepSeek's parser reads it."""
    calls_open = f"\n\n<{DSML}tool_calls"
    reasoning = ""
    if thinking:
        reasoning, sep, text = text.partition(END_THINK)
        if not sep or calls_open in reasoning:
            raise ValueError("thinking output without </think>")
    cut = min((p for p in (text.find(EOS), text.find(calls_open)) if p >= 0), default=-1)
    if cut < 0:
        raise ValueError("completion without EOS")
    content, rest = text[:cut], text[cut:]
    calls = []
    if rest.startswith(calls_open):
        block, sep, tail = rest[len(calls_open) :].partition(f"</{DSML}tool_calls>")
        if not sep or tail != EOS or not block.startswith(">\n"):
            raise ValueError("malformed tool call block")
        calls = _parse_invokes(block[2:])
    elif rest != EOS:
        raise ValueError("text after EOS")
    for token in (BOS, EOS, THINK, END_THINK, DSML):
        if token in content or token in reasoning:
            raise ValueError(f"special token {token} in the text")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}


def _parse_invokes(block: str) -> list[dict[str, Any]]:
    calls = []
    open_invoke, close_invoke = f'<{DSML}invoke name="', f"</{DSML}invoke>\n"
    while block:
        if not block.startswith(open_invoke):
            raise ValueError(f"expected an invoke, got {block[:40]!r}")
        head, _, block = block[len(open_invoke) :].partition('">\n')
        body, sep, block = block.partition(close_invoke)
        if not sep:
            raise ValueError("invoke without its end")
        pairs: list[str] = []
        names: set[str] = set()
        for line in filter(None, ("" if body == "\n" else body).split(f"</{DSML}parameter>\n")):
            name_part, _, value = line.removeprefix(f'<{DSML}parameter name="').partition('">')
            name, _, is_string = name_part.partition('" string="')
            if name in names:
                raise ValueError(f"parameter {name} twice")
            names.add(name)
            pairs.append(f"{_json(name)}: {_json(value) if is_string == 'true' else value}")  # values as written
        calls.append({"type": "function", "function": {"name": head, "arguments": "{" + ", ".join(pairs) + "}"}})
    return calls
