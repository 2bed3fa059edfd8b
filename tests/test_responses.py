"""OpenAI's Responses API through the openai SDK on every backend: responses, streams with the
documented events, function tools over two turns, structured output, stored responses and
previous_response_id, owned by the key that made them."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.test_analytics import make_key
from tests.test_tools import SCHEMAS, model_settings

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": SCHEMAS["get_weather"],
}


def respond(client, input="Hello there", **kwargs):
    kwargs.setdefault("max_output_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.responses.create(model="tiny", input=input, **kwargs)


def test_a_response_comes_back_in_its_documented_shape(client):
    response = respond(client)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == "tiny"
    assert response.status in ("completed", "incomplete")
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text
    assert response.usage.output_tokens <= 8
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if response.usage.output_tokens == 8:
        assert response.status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"


def test_instructions_and_message_items_reach_the_prompt(client):
    plain = respond(client, max_output_tokens=1)
    instructed = respond(
        client, max_output_tokens=1, instructions="You are a pirate. Answer like one. " * 10
    )
    items = respond(
        client,
        max_output_tokens=1,
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Hello there"}]},
            {"role": "assistant", "content": "Ahoy."},
            {"role": "user", "content": "And again?"},
        ],
    )
    assert instructed.usage.input_tokens > plain.usage.input_tokens
    assert items.usage.input_tokens > plain.usage.input_tokens


def test_a_streamed_response_has_the_documented_events_and_equals_the_full_one(client):
    full = respond(client)
    with client.responses.stream(
        model="tiny", input="Hello there", max_output_tokens=8, temperature=0
    ) as stream:
        events = list(stream)
    # The last event carries the response (the SDK's get_final_response wants completed ones).
    final = events[-1].response
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert kind in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == final.output_text == full.output_text
    assert final.status == full.status
    assert final.usage.output_tokens == full.usage.output_tokens


def test_function_tools_over_two_turns(client):
    first = respond(
        client,
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=80,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    second = respond(
        client,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=4,
    )
    assert second.previous_response_id == first.id
    assert second.output[0].type == "message"
    alone = respond(
        client,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=4,
    )
    # The first turn (its question and call) is in the second one's prompt.
    assert second.usage.input_tokens > alone.usage.input_tokens + 10


def test_a_streamed_function_call_streams_its_arguments(client):
    with client.responses.stream(
        model="tiny",
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=80,
        temperature=0,
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    (call,) = [item for item in final.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])


class Verdict(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool


def test_parse_returns_the_pydantic_model(client):
    parsed = client.responses.parse(
        model="tiny",
        input="A verdict, please.",
        text_format=Verdict,
        max_output_tokens=40,
        temperature=0,
    )
    assert isinstance(parsed.output_parsed, Verdict)


def test_stored_responses_are_retrieved_deleted_and_private_to_their_key(client, server):
    response = respond(client)
    assert client.responses.retrieve(response.id).output_text == response.output_text
    other = openai.OpenAI(
        base_url=server.url + "/v1", api_key=make_key(server, "other-key"), max_retries=0
    )
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        respond(other, previous_response_id=response.id)
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    unstored = respond(client, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_fields_we_cannot_honour_are_refused(client):
    with pytest.raises(openai.BadRequestError) as info:
        respond(client, background=True)
    assert "background" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        respond(client, input=[{"role": "user", "content": [{"type": "input_image"}]}])


def test_reasoning_comes_back_as_a_reasoning_item(client, server):
    from tests.test_reasoning import THINKING_TEMPLATE

    with model_settings(server, "tiny-special", chat_template=THINKING_TEMPLATE):
        response = client.responses.create(
            model="tiny-special",
            input="Think.",
            max_output_tokens=8,
            temperature=0,
            reasoning={"effort": "high"},
        )
    # A random-weight model never closes its reasoning: all of it is the reasoning item.
    assert response.output[0].type == "reasoning"
    assert response.output[0].content[0].text
    assert response.usage.output_tokens_details.reasoning_tokens == 8


def test_a_whole_conversation_can_be_sent_as_items_without_storing(client):
    response = respond(
        client,
        store=False,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris","unit":"celsius"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        ],
        tools=[WEATHER],
        max_output_tokens=4,
    )
    question = respond(
        client, store=False, input="Weather in Paris?", tools=[WEATHER], max_output_tokens=1
    )
    # The call and its result are in the prompt, and nothing was kept.
    assert response.usage.input_tokens > question.usage.input_tokens + 10
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_the_new_endpoints_are_counted_under_their_own_names(server, client):
    import anthropic
    import httpx

    from tests.helpers import API_KEY, wait_until

    respond(client, max_output_tokens=1)
    anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0).messages.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    client.embeddings.create(model="minilm", input="hi")

    def counted() -> bool:
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        return all(
            f'endpoint="{name}"' in metrics for name in ("responses", "messages", "embeddings")
        )

    wait_until(counted, timeout=60)


def test_a_stored_response_past_its_time_is_gone(client, server):
    response = respond(client, max_output_tokens=1)
    server.manage(
        "shell",
        "--no-imports",
        "-c",
        "from django.utils import timezone; from inference.models import StoredResponse; "
        f"StoredResponse.objects.filter(id={response.id!r}).update(expires_at=timezone.now())",
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_a_keys_allow_list_holds_on_the_new_endpoints(server):
    import anthropic

    key = make_key(server, "tiny-only", allowed_models=["tiny"])
    narrow = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    assert respond(narrow, max_output_tokens=1).model == "tiny"
    with pytest.raises(openai.NotFoundError):
        narrow.embeddings.create(model="minilm", input="hi")
    with pytest.raises(openai.NotFoundError):
        narrow.responses.create(model="tiny-special", input="hi", max_output_tokens=1)
    claude = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(
            model="tiny-special", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
