"""OpenAI request schemas (fields in the order OpenAI documents them) and response builders.

Unknown fields are ignored, not rejected, as OpenAI-compatible servers conventionally do. Responses
are built as plain dicts: they are serialised once per token on the hot path.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from ninja import Schema
from pydantic import Field, field_validator, model_validator

Stop = str | list[str] | None


class TextPart(Schema):
    type: Literal["text"]
    text: str


class ImagePart(Schema):
    type: Literal["image_url", "input_audio", "file"]


class FunctionCall(Schema):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(Schema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def text_only(content: Any, other: type) -> Any:
    """A content field's value, or a ValueError naming the first part of a kind (`other`:
    images, audio, files) that this server does not take."""
    if isinstance(content, list):
        for part in content:
            if isinstance(part, other):
                raise ValueError(f"content parts of type '{part.type}' are not supported; use text")
    return content


class Message(Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this answers

    @model_validator(mode="after")
    def tool_fields_on_their_roles(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("messages with role 'tool' need a `tool_call_id`")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry `tool_calls`")
        return self

    @field_validator("content")
    @classmethod
    def only_text_parts(cls, value):
        return text_only(value, ImagePart)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class FunctionDefinition(Schema):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None takes no arguments
    strict: bool | None = None


class Tool(Schema):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Schema):
    name: str


class NamedToolChoice(Schema):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Schema):
    include_usage: bool = False


class JSONSchemaFormat(Schema):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Schema):
    type: Literal["text", "json_object", "json_schema"] = "text"
    # ninja's Schema has a json_schema() method: the field keeps the wire name through its alias
    json_schema_: JSONSchemaFormat | None = Field(default=None, alias="json_schema")

    @model_validator(mode="after")
    def schema_for_json_schema(self):
        if self.type == "json_schema" and self.json_schema_ is None:
            raise ValueError("response_format of type json_schema needs `json_schema`")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The schema the output must match; None for any JSON object (json_object)."""
        if self.type == "json_schema" and self.json_schema_.schema_ is not None:
            return self.json_schema_.schema_
        return None


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingFields(Schema):
    """Parameters shared by both endpoints, plus the common extensions (top_k, min_p, ...)."""

    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    presence_penalty: Penalty | None = None
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    user: str | None = None
    # Extensions understood by vLLM, Ollama and mlx_lm.server.
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value: Stop) -> Stop:
        if isinstance(value, list):
            if len(value) > 4:
                raise ValueError("at most 4 stop sequences are allowed")
            if any(s == "" for s in value):
                raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def token_id_keys(cls, value):
        if value and len(value) > 300:
            raise ValueError("logit_bias takes at most 300 tokens")
        if value:
            for key in value:
                if not key.lstrip("-").isdigit() or int(key) < 0:
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def refuse(field: str, why: str) -> None:
    """A field we cannot honour yet: a 400 naming it, never a silent 200 without it."""
    raise ValueError(f"`{field}` is not supported by this server: {why}")


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    model: str
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    logprobs: bool | None = False
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    modalities: list[str] | None = None
    parallel_tool_calls: bool | None = None
    prediction: Any = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # vLLM's extension: more variables for the chat template (enable_thinking, ...)
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("audio", "prediction", "functions", "function_call")
    @classmethod
    def not_implemented(cls, value, info):
        if value is not None:
            refuse(info.field_name, "leave it out")
        return value

    @field_validator("modalities")
    @classmethod
    def text_only(cls, value):
        if value and value != ["text"]:
            refuse("modalities", "only text is generated")
        return value

    @field_validator("tools")
    @classmethod
    def distinct_tool_names(cls, value):
        if value:
            names = [t.function.name for t in value]
            duplicate = next((n for n in names if names.count(n) > 1), None)
            if duplicate:
                raise ValueError(f"tool names must be unique: `{duplicate}` appears twice")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def template_variables_only(cls, value):
        reserved = {"messages", "tools", "add_generation_prompt", "tokenize", "chat_template"}
        for key in value or {}:
            if not key.isidentifier() or key in reserved:
                raise ValueError(f"`{key}` cannot be passed to the chat template")
        return value

    @model_validator(mode="after")
    def tool_choice_names_an_offered_tool(self):
        choice = self.tool_choice
        if choice is None or choice == "none" or choice == "auto":
            return self
        if not self.tools:
            raise ValueError("`tool_choice` other than none and auto needs `tools`")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.function.name for t in self.tools}:
                raise ValueError(
                    f"`tool_choice` names `{choice.function.name}`, which is not in `tools`"
                )
        return self

    def offered_tools(self) -> list[Tool]:
        """The tools the model may call: none when tool_choice is none, one when it is named."""
        if not self.tools or self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function.name]
        return list(self.tools)

    def constrained(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    @model_validator(mode="after")
    def top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` requires `logprobs` to be true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, value):
        if value:
            refuse("suffix", "fill-in-the-middle is not implemented")
        return value

    @field_validator("prompt")
    @classmethod
    def non_empty_prompt(cls, value):
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be an empty list")
        return value

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(Schema):
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    dimensions: Annotated[int, Field(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input")
    @classmethod
    def non_empty_input(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        if isinstance(value, str) and not value:
            raise ValueError("input must not be an empty string")
        if isinstance(value, list) and any(v == "" or v == [] for v in value):
            raise ValueError("input must not hold empty strings or empty token lists")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("input holds at most 2048 items")
        return value

    def inputs(self) -> list[str | list[int]]:
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(v, int) for v in value):
            return [list(value)]
        return list(value)


# --- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    reasoning_tokens: int | None = None,
) -> dict:
    body = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return body


def chat_completion(
    id: str, created: int, model: str, choices: list[dict], usage_: dict, fingerprint: str
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage_,
    }


def chat_chunk(
    id: str,
    created: int,
    model: str,
    choices: list[dict],
    fingerprint: str,
    usage_: dict | None = None,
) -> dict[str, Any]:
    chunk = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def text_completion(
    id: str, created: int, model: str, choices: list[dict], usage_: dict | None, fingerprint: str
) -> dict[str, Any]:
    body = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body
