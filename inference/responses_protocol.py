"""OpenAI's Responses API: the request schema (fields in the order OpenAI documents them), its
translation into chat messages, and the response, item and event builders.

A Responses request becomes a ChatCompletionRequest, so it runs the chat pipeline unchanged
(templates, tools, structured outputs, reasoning, both backends); only the shapes differ.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import orjson
from ninja import Schema
from pydantic import Field, field_validator

from inference import protocol


class InputText(Schema):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputOther(Schema):
    type: Literal["input_image", "input_file", "input_audio", "refusal"]


class MessageItem(Schema):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText | InputOther]
    id: str | None = None
    status: str | None = None

    @field_validator("content")
    @classmethod
    def text_only(cls, value):
        return protocol.text_only(value, InputOther)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, InputText))


class FunctionCallItem(Schema):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Schema):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(p.text for p in self.output)


class ReasoningItem(Schema):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(Schema):
    type: Literal["function"]
    name: protocol.FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Schema):
    type: Literal["function"]
    name: str


class TextFormat(Schema):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(Schema):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(Schema):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


class ResponsesRequest(Schema):
    background: bool | None = None
    conversation: Any = None
    include: list[str] | None = None
    input: str | list[Item]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    metadata: dict[str, str] | None = None
    model: str
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    prompt: Any = None
    reasoning: ReasoningConfig | None = None
    store: bool = True
    stream: bool = False
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    text: TextConfig | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    tools: list[FunctionTool] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None

    @field_validator("background", "conversation", "prompt")
    @classmethod
    def not_implemented(cls, value, info):
        if value:
            protocol.refuse(info.field_name, "leave it out")
        return value

    @field_validator("truncation")
    @classmethod
    def no_truncation(cls, value):
        if value == "auto":
            protocol.refuse("truncation", "inputs are never truncated; use disabled")
        return value

    @field_validator("input")
    @classmethod
    def non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        return value

    def input_messages(self) -> list[dict[str, Any]]:
        """The input as chat messages (without the instructions, which do not carry over)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        out: list[dict[str, Any]] = []
        for item in self.input:
            if isinstance(item, MessageItem):
                out.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = out[-1] if out else None
                if last and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
            # Reasoning items are the model's own thoughts: templates leave past ones out.
        return out

    def chat_request(self, history: list[dict[str, Any]]) -> protocol.ChatCompletionRequest:
        messages = list(history) + self.input_messages()
        if self.instructions:
            messages.insert(0, {"role": "system", "content": self.instructions})
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.max_output_tokens is not None:
            body["max_tokens"] = self.max_output_tokens
        for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.top_logprobs:
            body["logprobs"], body["top_logprobs"] = True, self.top_logprobs
        if self.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                        "strict": t.strict,
                    },
                }
                for t in self.tools
            ]
        if isinstance(self.tool_choice, NamedFunction):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": fmt.name or "output",
                    "schema": fmt.schema_,
                    "strict": fmt.strict,
                },
            }
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["reasoning_effort"] = self.reasoning.effort
        return protocol.ChatCompletionRequest.model_validate(body)


# --- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(id: str, text: str, status: str, logprobs: list | None = None) -> dict:
    return {
        "type": "message",
        "id": id,
        "status": status,
        "role": "assistant",
        "content": [output_text(text, logprobs)],
    }


def output_text(text: str, logprobs: list | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def reasoning_item(id: str, text: str, status: str = "completed") -> dict:
    return {
        "type": "reasoning",
        "id": id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def function_call_item(id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "type": "function_call",
        "id": id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def usage(prompt: int, cached: int, output: int, reasoning: int) -> dict:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output,
    }


def response(
    request: ResponsesRequest,
    id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict],
    usage_: dict | None,
    incomplete: str | None = None,
) -> dict[str, Any]:
    fmt = request.text.format if request.text and request.text.format else None
    text_format = {"type": "text"}
    if fmt is not None:
        text_format = {"type": fmt.type}
        if fmt.type == "json_schema":
            text_format |= {
                "name": fmt.name or "output",
                "schema": fmt.schema_,
                "strict": fmt.strict,
            }
    tool_choice = request.tool_choice or "auto"
    if isinstance(tool_choice, NamedFunction):
        tool_choice = {"type": "function", "name": tool_choice.name}
    return {
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "metadata": request.metadata or {},
        "model": model,
        "output": output,
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "reasoning": {
            "effort": request.reasoning.effort if request.reasoning else None,
            "summary": None,
        },
        "store": request.store,
        "temperature": request.temperature,
        "text": {"format": text_format},
        "tool_choice": tool_choice,
        "tools": [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": t.strict,
            }
            for t in request.tools or []
        ],
        "top_p": request.top_p,
        "truncation": "disabled",
        "usage": usage_,
        "user": request.user,
    }


def output_messages(output: list[dict]) -> list[dict[str, Any]]:
    """A response's output items as the chat messages that continue its conversation."""
    text = "".join(
        part["text"]
        for item in output
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def sse(kind: str, sequence: int, **fields: Any) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": sequence, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
