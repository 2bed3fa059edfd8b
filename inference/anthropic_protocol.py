"""Anthropic's Messages API: request schemas (fields in the order Anthropic documents them), the
translation into our chat request, and response and event builders.

A Messages request becomes a ChatCompletionRequest, so it runs the chat pipeline unchanged
(templates, tools, structured outputs, reasoning, both backends); only the shapes differ.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

import orjson
from ninja import Schema
from pydantic import Field, field_validator

from inference import protocol


class CacheControlled(Schema):
    # Accepted as the hint it is: prefixes are cached automatically (cache_read_input_tokens).
    cache_control: dict[str, Any] | None = None


class TextBlock(CacheControlled):
    type: Literal["text"]
    text: str


class ImageBlock(Schema):
    type: Literal["image", "document", "search_result", "container_upload"]


class ToolUseBlock(CacheControlled):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(CacheControlled):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        if any(isinstance(part, ImageBlock) for part in self.content):
            raise ValueError("tool results with images are not supported; use text")
        return "".join(part.text for part in self.content)


class ThinkingBlock(Schema):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Schema):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class InputMessage(Schema):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @field_validator("content")
    @classmethod
    def text_only(cls, value):
        return protocol.text_only(value, ImageBlock)


class ToolDefinition(CacheControlled):
    name: protocol.FunctionName
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None  # server tools (web search, ...) are not ours to run


class ToolChoice(Schema):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(Schema):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class Metadata(Schema):
    user_id: str | None = None


class OutputFormat(Schema):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Schema):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class CountTokensRequest(Schema):
    model: str
    messages: list[InputMessage] = Field(min_length=1)
    cache_control: dict[str, Any] | None = None  # a hint; prefixes are cached automatically
    output_config: OutputConfig | None = None
    system: str | list[TextBlock] | None = None
    thinking: ThinkingConfig | None = None
    tool_choice: ToolChoice | None = None
    tools: list[ToolDefinition] | None = None

    def chat_request(self, **extra: Any) -> protocol.ChatCompletionRequest:
        """This request as our chat request (a 400 in the caller's shape if it is not one)."""
        body: dict[str, Any] = {"model": self.model, "messages": self._chat_messages(), **extra}
        if self.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.input_schema,
                    },
                }
                for t in self.tools
            ]
        choice = self.tool_choice
        if choice is not None:
            if choice.type == "tool":
                if not choice.name:
                    raise ValueError("tool_choice of type tool needs `name`")
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[
                    choice.type
                ]
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        if self.thinking is not None and self.thinking.type != "adaptive":
            body["chat_template_kwargs"] = {"enable_thinking": self.thinking.type == "enabled"}
        config = self.output_config
        if config is not None and config.effort is not None:
            body["reasoning_effort"] = "xhigh" if config.effort == "max" else config.effort
        if config is not None and config.format is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": config.format.schema_, "strict": True},
            }
        return protocol.ChatCompletionRequest.model_validate(body)

    def _chat_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.system:
            system = (
                self.system
                if isinstance(self.system, str)
                else "\n\n".join(b.text for b in self.system)
            )
            out.append({"role": "system", "content": system})
        for message in self.messages:
            blocks = (
                [TextBlock(type="text", text=message.content)]
                if isinstance(message.content, str)
                else message.content
            )
            text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
            if message.role == "assistant":
                calls = [
                    {
                        "id": b.id,
                        "type": "function",
                        "function": {"name": b.name, "arguments": json.dumps(b.input)},
                    }
                    for b in blocks
                    if isinstance(b, ToolUseBlock)
                ]
                entry: dict[str, Any] = {"role": "assistant", "content": text or None}
                if calls:
                    entry["tool_calls"] = calls
                out.append(entry)
                continue
            for b in blocks:  # tool results answer the previous turn's calls, before any text
                if isinstance(b, ToolResultBlock):
                    result = b.text()
                    out.append(
                        {
                            "role": "tool",
                            "tool_call_id": b.tool_use_id,
                            "content": f"Error: {result}" if b.is_error else result,
                        }
                    )
            if text or not any(isinstance(b, ToolResultBlock) for b in blocks):
                out.append({"role": "user", "content": text})
        return out


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1)]
    metadata: Metadata | None = None
    service_tier: str | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    # Sampling, as older clients send it (today's SDK no longer has these fields)
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None

    def chat_request(self, **extra: Any) -> protocol.ChatCompletionRequest:
        fields: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.stop_sequences:
            fields["stop"] = self.stop_sequences
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if self.metadata is not None and self.metadata.user_id:
            fields["user"] = self.metadata.user_id
        return super().chat_request(**fields, **extra)


# --- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
    }


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, Any]:
    # Anthropic's input_tokens leave out what was read from the cache.
    return {
        "input_tokens": prompt_tokens - cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached_tokens,
        "output_tokens": output_tokens,
    }


def message(
    id: str,
    model: str,
    content: list[dict[str, Any]],
    stop_reason: str | None,
    stop_sequence: str | None,
    usage_: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_,
    }


def event(kind: str, **fields: Any) -> bytes:
    payload = orjson.dumps({"type": kind, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"
