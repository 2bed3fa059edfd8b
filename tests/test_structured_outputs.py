"""Structured outputs (response_format) through the openai SDK on every backend: outputs validate
against their schema even on a random-weight model, which writes nonsense when unconstrained."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.test_chat_completions import NO_EOS

# Twenty varied schemas whose every output is short (bounded strings, numbers, arrays), so that a
# random-weight model, which never chooses to end a string or a number, still finishes.
NAME = {"type": "string", "maxLength": 12}
SCHEMAS = {
    "flat object": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "boolean": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    "const": {
        "type": "object",
        "properties": {
            "kind": {"const": "point"},
            "x": {"type": "integer", "minimum": -9, "maximum": 9},
        },
        "required": ["kind", "x"],
        "additionalProperties": False,
    },
    "nested object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "name": NAME,
                },
                "required": ["id", "name"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "array with bounds": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"enum": ["a", "b", "c"]},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "array of objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 6},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "defs and refs": {
        "$defs": {
            "Point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 9},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/Point"}, "b": {"$ref": "#/$defs/Point"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "nullable": {
        "type": "object",
        "properties": {"note": {"anyOf": [NAME, {"type": "null"}]}},
        "required": ["note"],
        "additionalProperties": False,
    },
    "union of types": {
        "type": "object",
        "properties": {
            "v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}]}
        },
        "required": ["v"],
        "additionalProperties": False,
    },
    "exclusive range": {
        "type": "object",
        "properties": {"t": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}},
        "required": ["t"],
        "additionalProperties": False,
    },
    "string pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "string format": {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
        "additionalProperties": False,
    },
    "min length": {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 5}},
        "required": ["word"],
        "additionalProperties": False,
    },
    "several required": {
        "type": "object",
        "properties": {
            "a": {"type": "boolean"},
            "b": {"enum": [1, 2, 3]},
            "c": {"type": "null"},
            "d": {"type": "string", "maxLength": 4},
        },
        "required": ["a", "b", "c", "d"],
        "additionalProperties": False,
    },
    "top-level array": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 2,
        "maxItems": 4,
    },
    "top-level enum": {"enum": ["yes", "no"]},
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["x", "y"]}],
        "items": False,
    },
    "allOf": {
        "allOf": [
            {
                "type": "object",
                "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 5}},
                "required": ["a"],
            },
            {
                "type": "object",
                "properties": {"a": {"type": "integer"}},
                "additionalProperties": False,
            },
        ]
    },
    "deep nesting": {
        "type": "object",
        "properties": {
            "l1": {
                "type": "object",
                "properties": {
                    "l2": {
                        "type": "object",
                        "properties": {"l3": {"enum": [True, False]}},
                        "required": ["l3"],
                        "additionalProperties": False,
                    }
                },
                "required": ["l2"],
                "additionalProperties": False,
            }
        },
        "required": ["l1"],
        "additionalProperties": False,
    },
}


def whitespace_outside_strings(text: str) -> list[int]:
    """Positions of whitespace between JSON tokens (inside strings it is content)."""
    found, in_string, escaped = [], False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch.isspace():
            found.append(i)
    return found


def test_the_whitespace_check_sees_whitespace_between_tokens_only():
    assert whitespace_outside_strings('{"a b":"c\\" d","e":[1,2]}') == []
    assert whitespace_outside_strings('{"a": 1,\n"b":2}') == [5, 8]


def structured(client, schema, *, model="tiny", content="Describe something.", **kwargs):
    kwargs.setdefault("max_tokens", 64)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
        extra_body=NO_EOS,  # only the grammar may end the answer
        **kwargs,
    )


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate_against_their_schema(client, name):
    reply = structured(client, SCHEMAS[name])
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
    assert not whitespace_outside_strings(choice.message.content)  # compact JSON


def test_a_streamed_json_schema_output_equals_the_full_one(client):
    schema = SCHEMAS["array of objects"]
    full = structured(client, schema).choices[0].message.content
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Describe something."}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        extra_body=NO_EOS,
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full


def test_every_choice_and_a_sampled_answer_follow_the_schema(client):
    schema = SCHEMAS["several required"]
    reply = structured(client, schema, n=3, temperature=1.0, seed=7)
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)


class Item(BaseModel):
    sku: str = Field(max_length=8)
    quantity: int = Field(ge=1, le=9)


class Order(BaseModel):
    customer: str = Field(max_length=12)
    items: list[Item] = Field(max_length=2)
    rush: bool


def test_parse_returns_the_pydantic_model(client):
    completion = client.chat.completions.parse(
        model="tiny",
        messages=[{"role": "user", "content": "An order, please."}],
        response_format=Order,
        max_tokens=80,
        temperature=0,
        extra_body=NO_EOS,
    )
    order = completion.choices[0].message.parsed
    assert isinstance(order, Order)
    assert all(1 <= item.quantity <= 9 for item in order.items)


def test_constrained_and_free_requests_share_the_batch(server):
    async def main():
        client = server.async_openai()
        free = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Go on"}],
            max_tokens=24,
            temperature=0,
            extra_body=NO_EOS,
        )
        constrained = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Go on"}],
            max_tokens=64,
            temperature=0,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": SCHEMAS["defs and refs"]},
            },
            extra_body=NO_EOS,
        )
        return await asyncio.gather(free, constrained)

    free, constrained = asyncio.run(main())
    assert free.choices[0].finish_reason == "length"  # unconstrained: runs to max_tokens
    jsonschema.validate(
        json.loads(constrained.choices[0].message.content), SCHEMAS["defs and refs"]
    )


@pytest.mark.parametrize(
    "schema, feature",
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "not": {"required": ["a"]}}, "not"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ],
)
def test_a_schema_feature_we_cannot_enforce_is_a_400_naming_it(client, schema, feature):
    with pytest.raises(openai.BadRequestError) as info:
        structured(client, schema)
    assert info.value.body["param"] == "response_format"
    assert feature in info.value.body["message"]


@pytest.mark.real_model
def test_smollm2_answers_json_objects_and_parsed_models(real_server):
    client = real_server.openai()
    reply = client.chat.completions.create(
        model="smollm2",
        # Named keys: asked for "JSON" alone, greedy SmolLM2 on llama.cpp's AVX-512 kernels
        # writes an ever longer object of population figures.
        messages=[
            {
                "role": "user",
                "content": 'Give the capital of France as JSON with the key "capital".',
            }
        ],
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)

    class Capital(BaseModel):
        country: str = Field(max_length=20)
        capital: str = Field(max_length=20)

    parsed = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        response_format=Capital,
        max_tokens=60,
        temperature=0,
    )
    assert "Paris" in parsed.choices[0].message.parsed.capital


def strict_json(text: str):
    """JSON as JavaScript reads it: Python's json would also take NaN and -Infinity."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_logprobs_of_tokens_the_grammar_rules_out_are_a_finite_floor(server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Pick one."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": SCHEMAS["enum"]},
        },
        "logprobs": True,
        "top_logprobs": 20,
        "max_tokens": 16,
        "temperature": 0,
        **NO_EOS,
    }
    with server.http() as http:
        full = strict_json(http.post("/v1/chat/completions", json=body).text)
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    entries = full["choices"][0]["logprobs"]["content"]
    for event in map(strict_json, events):
        for choice in event["choices"]:
            entries += (choice["logprobs"] or {}).get("content") or []
    assert entries
    for entry in entries:
        for logprob in [entry["logprob"]] + [t["logprob"] for t in entry["top_logprobs"]]:
            assert -9999.0 <= logprob <= 0
