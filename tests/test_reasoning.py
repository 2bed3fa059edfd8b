"""Reasoning models through the openai SDK on every backend: the thinking goes to
reasoning_content, the answer to content, usage counts reasoning tokens, a per-model setting
turns the parser off, and reasoning_effort reaches the template."""

from __future__ import annotations

import json

import jsonschema

from tests.test_chat_completions import NO_EOS
from tests.test_tools import model_settings

# SmolLM2's template with Qwen3's thinking switch: the answer starts inside <think> unless the
# request turns thinking off, when the template writes an empty reasoning block itself.
THINKING_TEMPLATE = """\
{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""


def ask(client, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "How many r's in strawberry?"}],
        extra_body=NO_EOS | kwargs.pop("extra_body", {}),
        **kwargs,
    )


def test_a_thinking_answer_goes_to_reasoning_content_and_is_counted(client, server):
    with model_settings(server, chat_template=THINKING_TEMPLATE, reasoning_parser="think"):
        reply = ask(client)
        stream = list(ask(client, stream=True, stream_options={"include_usage": True}))
    message = reply.choices[0].message
    # A random-weight model never closes its reasoning: all of it is reasoning.
    assert message.reasoning_content
    assert message.content is None
    details = reply.usage.completion_tokens_details
    assert details.reasoning_tokens == reply.usage.completion_tokens == 12
    streamed = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in stream if c.choices
    )
    assert streamed == message.reasoning_content
    assert not any(c.choices[0].delta.content for c in stream if c.choices)
    assert stream[-1].usage.completion_tokens_details.reasoning_tokens == 12


def test_with_the_parser_off_the_thinking_stays_in_content(client, server):
    with model_settings(server, chat_template=THINKING_TEMPLATE, reasoning_parser="think"):
        thought = ask(client).choices[0].message.reasoning_content
    with model_settings(server, chat_template=THINKING_TEMPLATE, reasoning_parser="none"):
        reply = ask(client)
    assert reply.choices[0].message.content == thought
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None


def test_reasoning_effort_none_reaches_the_template_and_the_answer_is_content(client, server):
    with model_settings(server, chat_template=THINKING_TEMPLATE, reasoning_parser="think"):
        reply = ask(client, reasoning_effort="none")
    message = reply.choices[0].message
    assert message.content
    assert message.reasoning_content is None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0


def test_a_model_without_thinking_tokens_has_no_reasoning_parser_by_default(client):
    reply = ask(client)
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None
    assert reply.choices[0].message.content


# "</think>" is these three tokens in SmolLM2's vocabulary: favoured, a sampling random-weight
# model writes them in every order until it happens to close its reasoning.
CLOSE_THINK = {"9617": 100, "17400": 100, "46": 100}


def test_a_constrained_answer_starts_after_the_reasoning(client, server):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    with model_settings(server, chat_template=THINKING_TEMPLATE, reasoning_parser="think"):
        reply = ask(
            client,
            max_tokens=400,
            temperature=1.0,
            seed=11,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
            extra_body={"logit_bias": {**NO_EOS["logit_bias"], **CLOSE_THINK}},
        )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop", message.reasoning_content
    assert set(message.reasoning_content) <= set("</think>")
    jsonschema.validate(json.loads(message.content), schema)


def test_thinking_tokens_in_the_vocabulary_turn_the_parser_on_and_json_follows(server, special_ids):
    """tiny-special's vocabulary has <think> and </think> as tokens: its reasoning is read by
    default; with </think> favoured, the reasoning closes at once and the JSON answer follows."""
    client = server.openai()
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    with model_settings(server, "tiny-special", chat_template=THINKING_TEMPLATE):
        reply = client.chat.completions.create(
            model="tiny-special",
            messages=[{"role": "user", "content": "A digit, please."}],
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
            logit_bias={str(special_ids["</think>"]): 100},
        )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop", (message.content, message.reasoning_content)
    assert message.reasoning_content is None  # closed before any thought
    assert reply.usage.completion_tokens_details.reasoning_tokens == 1
    jsonschema.validate(json.loads(message.content), schema)
