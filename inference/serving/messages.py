"""POST /v1/messages (Anthropic's Messages API) and /v1/messages/count_tokens: the chat pipeline
with Anthropic's request, response, event and error shapes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from django.http import StreamingHttpResponse

from inference import anthropic_protocol as ap
from inference.serving.base import (
    Choice,
    Job,
    run_to_end,
    streaming_response,
    submit,
)
from inference.serving.chat import prepare_chat, translated
from inference.tools import ParsedCall
from inference.types import RequestStats


async def prepare_messages(
    payload: ap.MessagesRequest, stats: RequestStats | None = None, allowed: tuple[str, ...] = ()
) -> Job:
    job = await prepare_chat(translated(payload.chat_request), stats, allowed, read_answer=True)
    job.id = ap.new_id("msg")
    return job


async def count_tokens(
    payload: ap.CountTokensRequest, stats: RequestStats | None = None, allowed: tuple[str, ...] = ()
) -> dict:
    chat = translated(lambda: payload.chat_request(max_tokens=1))
    job = await prepare_chat(chat, stats, allowed)
    return {"input_tokens": job.prompt_tokens}


def _stop(choice: Choice, calls: list[ParsedCall]) -> tuple[str, str | None]:
    if choice.finish_reason == "length":
        return "max_tokens", None
    if calls:
        return "tool_use", None
    if choice.stop_string is not None:
        return "stop_sequence", choice.stop_string
    return "end_turn", None


def _tool_use(call: ParsedCall) -> dict:
    return {
        "type": "tool_use",
        "id": ap.new_id("toolu"),
        "name": call.name,
        "input": json.loads(call.arguments),
    }


def _usage(job: Job, output_tokens: int) -> dict:
    return ap.usage(job.prompt_tokens, job.cached_tokens, output_tokens)


async def messages_full(job: Job) -> dict:
    (choice,) = await run_to_end(job)
    reader = choice.reader
    content: list[dict] = []
    if reader.reasoning_text:
        content.append({"type": "thinking", "thinking": reader.reasoning_text, "signature": ""})
    if reader.content:
        content.append({"type": "text", "text": reader.content})
    content += [_tool_use(call) for call in reader.calls]
    stop_reason, stop_sequence = _stop(choice, reader.calls)
    return ap.message(
        job.id, job.spec.name, content, stop_reason, stop_sequence, _usage(job, choice.tokens)
    )


async def messages_stream(job: Job) -> StreamingHttpResponse:
    group = await submit(job)
    return streaming_response(_events(job, group), group)


async def _events(job: Job, group) -> AsyncIterator[bytes]:
    (choice,) = job.choices()
    index = -1
    open_kind: str | None = None  # the kind of the content block being streamed

    def close() -> list[bytes]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [ap.event("content_block_stop", index=index)]

    def start(kind: str, block: dict) -> list[bytes]:
        nonlocal index, open_kind
        out = close()
        index += 1
        open_kind = kind
        return out + [ap.event("content_block_start", index=index, content_block=block)]

    def blocks(reasoning: str, text: str, calls: list[ParsedCall]) -> list[bytes]:
        out: list[bytes] = []
        if reasoning:
            if open_kind != "thinking":
                out += start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            delta = {"type": "thinking_delta", "thinking": reasoning}
            out.append(ap.event("content_block_delta", index=index, delta=delta))
        if text:
            if open_kind != "text":
                out += start("text", {"type": "text", "text": ""})
            delta = {"type": "text_delta", "text": text}
            out.append(ap.event("content_block_delta", index=index, delta=delta))
        for call in calls:
            block = _tool_use(call)
            out += start("tool_use", block | {"input": {}})
            delta = {"type": "input_json_delta", "partial_json": call.arguments}
            out.append(ap.event("content_block_delta", index=index, delta=delta))
            out += close()
        return out

    try:
        first = ap.message(job.id, job.spec.name, [], None, None, _usage(job, 0))
        yield ap.event("message_start", message=first)
        yield ap.event("ping")
        async for _, delta in group:
            choice.feed(delta)
            if choice.finish_reason == "error":
                group.cancel()
                yield ap.event("error", error=ap.error_body(500, choice.error)["error"])
                return
            for frame in blocks(*choice.reader.take()):
                yield frame
            if choice.finish_reason is not None:
                break
        for frame in close():
            yield frame
        stop_reason, stop_sequence = _stop(choice, choice.reader.calls)
        yield ap.event(
            "message_delta",
            delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            usage={"output_tokens": choice.tokens},
        )
        yield ap.event("message_stop")
    finally:
        # Runs on normal end and on client disconnect (CancelledError): the slot is freed.
        group.cancel()
        job.note(group, [choice])
