"""Tool calling through the openai SDK and LangChain on every backend: forced calls are calls to an
offered function whose arguments validate, even from a random-weight model that writes nonsense
when free; `auto` leaves the model free until its tool-call trigger."""

from __future__ import annotations

import contextlib
import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.helpers import API_KEY, real_chat_template
from tests.test_chat_completions import NO_EOS

# Bounded arguments, so that a random-weight model, which never chooses to end a string, finishes.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"offset": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["offset"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# A chat template that renders tools the way Qwen 2.5's does (Hermes <tool_call> JSON).
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call functions. Their signatures:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}{% set tool_call = tool_call.function %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

DEFAULTS = {"chat_template": "", "tool_parser": "", "reasoning_parser": "auto"}


@contextlib.contextmanager
def model_settings(server, model="tiny", **fields):
    """A model's registry row changed for one test, as an operator would change it."""
    server.set_model(model, **fields)
    try:
        yield
    finally:
        server.set_model(model, **DEFAULTS)


def call(client, tool_choice="required", *, tools=TOOLS, content="Weather in Paris?", **kwargs):
    """One chat with tools. One call an answer unless asked: a random-weight model kept from
    its end-of-sequence token would otherwise call tools until it runs out of tokens."""
    kwargs.setdefault("max_tokens", 80)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("parallel_tool_calls", False)
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        tools=tools,
        tool_choice=tool_choice,
        extra_body=NO_EOS,  # only the grammar may end the answer
        **kwargs,
    )


def assert_valid_calls(message, names=tuple(SCHEMAS)):
    assert message.tool_calls, message.content
    for tool_call in message.tool_calls:
        assert tool_call.id.startswith("call_")
        assert tool_call.type == "function"
        assert tool_call.function.name in names
        arguments = json.loads(tool_call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[tool_call.function.name])


def test_tool_choice_required_answers_calls_whose_arguments_validate(client):
    reply = call(client)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert_valid_calls(choice.message)


def test_a_named_tool_choice_calls_that_function(client):
    reply = call(client, {"type": "function", "function": {"name": "get_time"}})
    assert reply.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(reply.choices[0].message, names=("get_time",))


def test_parallel_tool_calls_false_gives_exactly_one_call(client):
    for seed in range(3):
        reply = call(client, parallel_tool_calls=False, temperature=1.0, seed=seed)
        assert len(reply.choices[0].message.tool_calls) == 1
        assert reply.choices[0].finish_reason == "tool_calls"


def test_parallel_calls_are_each_read_and_a_call_cut_short_is_left_as_text(client):
    reply = call(client, parallel_tool_calls=True, max_tokens=160)
    message = reply.choices[0].message
    assert len(message.tool_calls) >= 2
    assert_valid_calls(message)
    assert reply.choices[0].finish_reason == "length"
    assert "<tool_call>" in message.content, message.content  # the unfinished one


def test_sampled_choices_each_call_a_tool(client):
    reply = call(client, n=3, temperature=1.0, seed=3)
    for choice in reply.choices:
        assert_valid_calls(choice.message)


def test_a_streamed_call_has_its_name_first_then_arguments_and_matches_the_full_one(client):
    full = call(client).choices[0].message.tool_calls
    stream = call(client, stream=True)
    chunks = [c for c in stream]
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    assert all(d.role is None for d in deltas[1:])
    calls: dict[int, dict] = {}
    for delta in deltas:
        for part in delta.tool_calls or []:
            if part.index not in calls:  # a call's first delta: its id, type and name
                assert part.id.startswith("call_") and part.type == "function"
                assert part.function.name
                calls[part.index] = {"name": part.function.name, "arguments": ""}
            calls[part.index]["arguments"] += part.function.arguments or ""
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in full
    ]


def test_tool_choice_none_never_calls_and_leaves_the_tools_out_of_the_prompt(client, server):
    with model_settings(server, chat_template=HERMES_TEMPLATE):
        reply = call(client, "none", max_tokens=8)
        plain = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            max_tokens=1,
        )
        listed = call(client, "auto", max_tokens=1)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens
    assert listed.usage.prompt_tokens > plain.usage.prompt_tokens  # the template listed them


def test_auto_leaves_a_model_that_does_not_call_free_to_answer(client):
    reply = call(client, "auto", max_tokens=10)
    choice = reply.choices[0]
    # A random-weight model writes text; that text is the answer, untouched by any grammar.
    assert choice.finish_reason == "length"
    assert choice.message.tool_calls is None
    assert choice.message.content


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral", "pythonic"])
def test_every_tool_call_format_is_forced_and_read_back(client, server, parser):
    with model_settings(server, tool_parser=parser):
        reply = call(client)
        stream = list(call(client, stream=True))
    assert reply.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(reply.choices[0].message)
    streamed = "".join(
        part.function.arguments or ""
        for chunk in stream
        for part in chunk.choices[0].delta.tool_calls or []
    )
    assert streamed == "".join(c.function.arguments for c in reply.choices[0].message.tool_calls)


def test_a_template_that_renders_tools_gets_them_and_its_calls_are_read(client, server):
    with model_settings(server, chat_template=HERMES_TEMPLATE):
        reply = call(client)
    assert_valid_calls(reply.choices[0].message)


def test_a_conversation_with_calls_and_results_continues(client, server):
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city":"Paris","unit":"celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    short = [history[0]]
    for template in ("", HERMES_TEMPLATE):  # the generic tool prompt, then the template's own
        with model_settings(server, chat_template=template):
            longer = client.chat.completions.create(
                model="tiny", messages=history, tools=TOOLS, max_tokens=4
            )
            shorter = client.chat.completions.create(
                model="tiny", messages=short, tools=TOOLS, max_tokens=4
            )
        # The call and its result are in the prompt.
        assert longer.usage.prompt_tokens > shorter.usage.prompt_tokens + 10


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools"),
    ],
)
def test_tool_requests_that_cannot_be_honoured_are_400s(server, body, param):
    response = server.http().post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"].startswith(param)


def test_history_with_broken_arguments_or_an_unanswerable_tool_message_is_a_400(client):
    bad_arguments = {
        "role": "assistant",
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}
        ],
    }
    no_id = {"role": "tool", "content": "18 degrees"}
    for message in (bad_arguments, no_id):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}, message], max_tokens=2
            )


def test_a_model_set_not_to_call_tools_refuses_them(client, server):
    with model_settings(server, tool_parser="none"):
        with pytest.raises(openai.BadRequestError) as info:
            call(client)
    assert info.value.body["param"] == "tools"


class Forecast(BaseModel):
    """A weather forecast."""

    city: str = Field(max_length=10)
    high: int = Field(ge=-50, le=60)


def langchain_model(server, **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=server.url + "/v1",
        api_key=API_KEY,
        model="tiny",
        temperature=0,
        max_tokens=80,
        max_retries=0,
        logit_bias={2: -100, 0: -100},
        **kwargs,
    )


def test_langchain_bind_tools_returns_tool_calls(server):
    llm = langchain_model(server).bind_tools([Forecast], tool_choice="Forecast")
    message = llm.invoke("Forecast for Paris, please.")
    assert message.tool_calls[0]["name"] == "Forecast"
    forecast = Forecast(**message.tool_calls[0]["args"])
    assert -50 <= forecast.high <= 60


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_the_model(server, method):
    llm = langchain_model(server).with_structured_output(Forecast, method=method)
    forecast = llm.invoke("Forecast for Paris, please.")
    assert isinstance(forecast, Forecast)


@pytest.mark.real_model
def test_smollm2_calls_a_tool_when_told_to(real_server):
    client = real_server.openai()
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(reply.choices[0].message)
    # The agent loop: the call and its result go back, and the model answers in words.
    tool_call = reply.choices[0].message.tool_calls[0]
    answer = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [tool_call.model_dump()]},
            {"role": "tool", "tool_call_id": tool_call.id, "content": "18 degrees and sunny"},
        ],
        tools=TOOLS,
        tool_choice="none",
        max_tokens=40,
        temperature=0,
    )
    assert answer.choices[0].message.content
    assert answer.choices[0].message.tool_calls is None
    auto = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS,
        max_tokens=60,
        temperature=0,
    )
    message = auto.choices[0].message
    # Free to answer or call; whichever it does is well formed.
    if message.tool_calls:
        assert_valid_calls(message)
    else:
        assert message.content


AGENT_HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0123456789abcdef01234567",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"city":"Paris","unit":"celsius"}',
                },
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "18 degrees"},
]


@pytest.mark.parametrize(
    "template",
    [
        "Qwen-Qwen2.5-7B-Instruct",
        "meta-llama-Llama-3.1-8B-Instruct",
        "mistralai-Mistral-Nemo-Instruct-2407",
        "LFM2-8B-A1B",
    ],
)
def test_real_templates_get_forced_calls_and_a_whole_agent_loop(client, server, template):
    with model_settings(server, chat_template=real_chat_template(template)):
        first = call(client)
        assert_valid_calls(first.choices[0].message)
        # The call goes back with its result; the model answers (or calls again).
        tool_call = first.choices[0].message.tool_calls[0]
        history = [
            AGENT_HISTORY[0],
            {"role": "assistant", "content": None, "tool_calls": [tool_call.model_dump()]},
            {"role": "tool", "tool_call_id": tool_call.id, "content": "18 degrees"},
        ]
        answer = client.chat.completions.create(
            model="tiny", messages=history, tools=TOOLS, max_tokens=6, temperature=0
        )
    assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls")
    message = answer.choices[0].message
    assert message.content or message.tool_calls, answer


@pytest.mark.parametrize(
    "parser, trigger",
    [
        ("hermes", "<tool_call>"),  # one token decoded as text, as in Qwen 2.5's vocabulary
        ("mistral", "[TOOL_CALLS]"),  # special tokens
        ("pythonic", "<|tool_call_start|>"),
    ],
)
def test_auto_reads_a_call_its_trigger_token_opens(server, special_ids, parser, trigger):
    client = server.openai()
    with model_settings(server, "tiny-special", tool_parser=parser):
        reply = client.chat.completions.create(
            model="tiny-special",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=TOOLS,
            tool_choice="auto",
            parallel_tool_calls=False,
            max_tokens=80,
            temperature=0,
            # The trigger token favoured: the model opens a call at once, as a trained one would.
            logit_bias={str(special_ids[trigger]): 100},
        )
        streamed = list(
            client.chat.completions.create(
                model="tiny-special",
                messages=[{"role": "user", "content": "Weather in Paris?"}],
                tools=TOOLS,
                parallel_tool_calls=False,
                max_tokens=80,
                temperature=0,
                logit_bias={str(special_ids[trigger]): 100},
                stream=True,
            )
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    assert_valid_calls(choice.message)
    arguments = "".join(
        part.function.arguments or ""
        for chunk in streamed
        for part in chunk.choices[0].delta.tool_calls or []
    )
    assert arguments == choice.message.tool_calls[0].function.arguments
