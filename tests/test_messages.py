"""Anthropic's Messages API through the official anthropic SDK on every backend: messages,
streams, tools, thinking, count_tokens and errors in Anthropic's shapes."""

from __future__ import annotations

from typing import Literal

import anthropic
import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from tests.helpers import API_KEY
from tests.test_reasoning import THINKING_TEMPLATE
from tests.test_tools import SCHEMAS, TOOLS, model_settings

ANTHROPIC_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)


# Today's anthropic SDK has no sampling fields; older clients send them, and greedy decoding
# keeps these tests deterministic.
GREEDY = {"temperature": 0}


def create(claude, content="Hello there", **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return claude.messages.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        extra_body=GREEDY,
        **kwargs,
    )


def test_a_message_comes_back_in_anthropics_shape(claude):
    message = create(claude, max_tokens=8)
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "tiny"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text
    assert message.stop_reason in ("max_tokens", "end_turn")
    assert message.usage.output_tokens <= 8
    assert message.usage.input_tokens > 0


def test_a_stop_sequence_ends_the_message_and_is_named(claude):
    text = create(claude, max_tokens=12).content[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = create(claude, max_tokens=12, stop_sequences=[stop])
    assert stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence == stop
    cut = "".join(b.text for b in stopped.content)
    assert text.startswith(cut + stop)  # cut at the stop's first appearance, which is left out


def test_a_streamed_message_has_anthropics_events_and_equals_the_full_one(claude):
    full = create(claude, max_tokens=10)
    with claude.messages.stream(
        model="tiny",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=10,
        extra_body=GREEDY,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(kinds)
    assert kinds[-2] == "message_delta"
    assert final.content[0].text == full.content[0].text
    assert final.stop_reason == full.stop_reason
    assert final.usage.output_tokens == full.usage.output_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_any_answers_a_tool_use_whose_input_validates(claude, stream):
    kwargs = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=80,
        extra_body=GREEDY,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    if stream:
        with claude.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    else:
        message = claude.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    (block,) = [b for b in message.content if b.type == "tool_use"]
    assert block.id.startswith("toolu_")
    jsonschema.validate(block.input, SCHEMAS[block.name])


def test_a_named_tool_and_a_whole_tool_loop(claude):
    first = claude.messages.create(
        model="tiny",
        messages=[{"role": "user", "content": "Time in Tokyo?"}],
        max_tokens=80,
        extra_body=GREEDY,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_time"},
    )
    use = next(b for b in first.content if b.type == "tool_use")
    assert use.name == "get_time"
    answer = claude.messages.create(
        model="tiny",
        messages=[
            {"role": "user", "content": "Time in Tokyo?"},
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "09:00"}],
            },
        ],
        max_tokens=6,
        extra_body=GREEDY,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "none"},
    )
    assert [b.type for b in answer.content] == ["text"]
    assert answer.stop_reason in ("max_tokens", "end_turn")


def test_count_tokens_counts_what_create_reads(claude):
    request = dict(
        model="tiny",
        system="You are terse.",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=ANTHROPIC_TOOLS,
    )
    counted = claude.messages.count_tokens(**request)
    message = claude.messages.create(max_tokens=2, **request)
    read = message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert counted.input_tokens == read


def test_thinking_comes_back_as_thinking_blocks(server, claude):
    with model_settings(server, "tiny-special", chat_template=THINKING_TEMPLATE):
        message = claude.messages.create(
            model="tiny-special",
            messages=[{"role": "user", "content": "Think."}],
            max_tokens=8,
            extra_body=GREEDY,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
        with claude.messages.stream(
            model="tiny-special",
            messages=[{"role": "user", "content": "Think."}],
            max_tokens=8,
            extra_body=GREEDY,
            thinking={"type": "enabled", "budget_tokens": 1024},
        ) as stream:
            kinds = {event.type for event in stream}
            streamed = stream.get_final_message()
    # A random-weight model never closes its thinking: all of it is a thinking block.
    assert [b.type for b in message.content] == ["thinking"]
    assert message.content[0].thinking
    assert "thinking" in kinds
    assert streamed.content[0].thinking == message.content[0].thinking


def test_errors_come_in_anthropics_shape(server, claude):
    wrong = anthropic.Anthropic(base_url=server.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        create(wrong)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert info.value.body["error"]["type"] == "not_found_error"
    response = httpx.post(
        server.url + "/v1/messages",
        headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 400  # max_tokens is required
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in response.json()["error"]["message"]


def test_a_request_shaped_like_claude_codes_works(server):
    """System blocks with cache_control, many tools, metadata, streaming, beta headers, Bearer."""
    tools = [
        {
            "name": f"tool_{i}",
            "description": f"Tool number {i}.",
            "input_schema": {
                "type": "object",
                "properties": {"path": {"type": "string", "maxLength": 8}},
                "required": ["path"],
            },
        }
        for i in range(15)
    ]
    body = {
        "model": "tiny",
        "max_tokens": 16,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are a coding agent."},
            {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "List the files."}]},
        ],
        "tools": tools,
        "metadata": {"user_id": "user-1"},
        "temperature": 0,
    }
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "interleaved-thinking-2025-05-14",
    }
    with httpx.stream("POST", server.url + "/v1/messages", json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("event: ") :] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop"


class Reading(BaseModel):
    # The SDK moves bounds (maxLength, minimum, ...) into descriptions before sending a schema,
    # so a random-weight model is held to short answers by enums and booleans here.
    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool


def test_structured_output_through_parse_returns_the_model(claude):
    parsed = claude.messages.parse(
        model="tiny",
        messages=[{"role": "user", "content": "A reading, please."}],
        max_tokens=60,
        output_format=Reading,
        extra_body=GREEDY,
    )
    assert parsed.stop_reason == "end_turn"
    assert isinstance(parsed.parsed_output, Reading)
