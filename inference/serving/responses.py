"""POST /v1/responses (OpenAI's Responses API), GET and DELETE /v1/responses/{id}: the chat
pipeline with the Responses shapes, and stored responses that `previous_response_id` continues."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import timedelta

from django.conf import settings
from django.http import StreamingHttpResponse
from django.utils import timezone

from inference import responses_protocol as rp
from inference.models import StoredResponse
from inference.serving.base import Choice, Job, run_to_end, streaming_response, submit
from inference.serving.chat import chat_logprobs, prepare_chat, translated
from inference.tools import ParsedCall, new_call_id
from inference.types import RequestStats
from llmservice.errors import APIError, not_found


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return not_found(f"No response found with id '{response_id}'.", param=param)


async def _stored(response_id: str, key_id: int | None, param: str | None = None):
    row = await StoredResponse.objects.live().owned_by(key_id).filter(id=response_id).afirst()
    if row is None:  # another key's responses do not exist for this one
        raise _not_found(response_id, param)
    return row


async def prepare_response(
    payload: rp.ResponsesRequest,
    key_id: int | None,
    stats: RequestStats | None = None,
    allowed: tuple[str, ...] = (),
) -> tuple[Job, list[dict]]:
    history: list[dict] = []
    if payload.previous_response_id:
        row = await _stored(payload.previous_response_id, key_id, "previous_response_id")
        history = list(row.conversation)
    chat = translated(lambda: payload.chat_request(history))
    job = await prepare_chat(chat, stats, allowed, read_answer=True)
    job.id = rp.new_id("resp")
    return job, history


def _status(choice: Choice) -> tuple[str, str | None]:
    if choice.finish_reason == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None


def _usage(job: Job, choice: Choice) -> dict:
    return rp.usage(
        job.prompt_tokens, job.cached_tokens, choice.tokens, choice.reader.reasoning_tokens
    )


def _call_item(call: ParsedCall, status: str, arguments: str | None = None) -> dict:
    return rp.function_call_item(
        rp.new_id("fc"),
        new_call_id(),
        call.name,
        call.arguments if arguments is None else arguments,
        status,
    )


async def _store(
    job: Job, payload: rp.ResponsesRequest, history: list[dict], key_id, body: dict
) -> None:
    now = timezone.now()
    await StoredResponse.objects.filter(expires_at__lte=now).adelete()
    await StoredResponse.objects.acreate(
        id=job.id,
        key_id=key_id,
        model=job.spec.name,
        created_at=now,
        expires_at=now + timedelta(days=settings.RESPONSES_TTL_DAYS),
        conversation=history + payload.input_messages() + rp.output_messages(body["output"]),
        body=body,
    )


async def response_full(
    job: Job, payload: rp.ResponsesRequest, history: list[dict], key_id: int | None
) -> dict:
    (choice,) = await run_to_end(job)
    reader = choice.reader
    status, incomplete = _status(choice)
    output: list[dict] = []
    if reader.reasoning_text:
        output.append(rp.reasoning_item(rp.new_id("rs"), reader.reasoning_text))
    if reader.content or not reader.calls:
        logprobs = chat_logprobs(job, choice.logprobs)
        output.append(
            rp.message_item(
                rp.new_id("msg"), reader.content, status, logprobs["content"] if logprobs else None
            )
        )
    output += [_call_item(call, "completed") for call in reader.calls]
    body = rp.response(
        payload, job.id, job.created, job.spec.name, status, output, _usage(job, choice), incomplete
    )
    if payload.store:
        await _store(job, payload, history, key_id, body)
    return body


async def response_stream(
    job: Job, payload: rp.ResponsesRequest, history: list[dict], key_id: int | None
) -> StreamingHttpResponse:
    group = await submit(job)
    return streaming_response(_events(job, group, payload, history, key_id), group)


async def _events(
    job: Job, group, payload: rp.ResponsesRequest, history: list[dict], key_id: int | None
) -> AsyncIterator[bytes]:
    (choice,) = job.choices()
    numbers = itertools.count()
    output: list[dict] = []  # items, the open one last while it streams
    open_kind: str | None = None
    text = ""
    logprobs_sent = 0

    def ev(kind: str, **fields) -> bytes:
        return rp.sse(kind, next(numbers), **fields)

    def where() -> dict:
        return {"item_id": output[-1]["id"], "output_index": len(output) - 1}

    def close() -> list[bytes]:
        nonlocal open_kind, text
        if open_kind is None:
            return []
        kind, body, open_kind, text = open_kind, text, None, ""
        if kind == "reasoning":
            output[-1] = rp.reasoning_item(output[-1]["id"], body)
            part = {"type": "reasoning_text", "text": body}
            done = [ev("response.reasoning_text.done", **where(), content_index=0, text=body)]
        else:
            status, _ = _status(choice)
            output[-1] = rp.message_item(output[-1]["id"], body, status)
            part = rp.output_text(body)
            done = [
                ev("response.output_text.done", **where(), content_index=0, text=body, logprobs=[])
            ]
        return done + [
            ev("response.content_part.done", **where(), content_index=0, part=part),
            ev("response.output_item.done", output_index=len(output) - 1, item=output[-1]),
        ]

    def start(kind: str) -> list[bytes]:
        nonlocal open_kind
        out = close()
        open_kind = kind
        if kind == "reasoning":
            item = {
                "type": "reasoning",
                "id": rp.new_id("rs"),
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {
                "type": "message",
                "id": rp.new_id("msg"),
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            part = rp.output_text("")
        output.append(item)
        return out + [
            ev("response.output_item.added", output_index=len(output) - 1, item=item),
            ev("response.content_part.added", **where(), content_index=0, part=part),
        ]

    def items(reasoning: str, content: str, calls: list[ParsedCall]) -> list[bytes]:
        nonlocal text, logprobs_sent
        out: list[bytes] = []
        if reasoning:
            if open_kind != "reasoning":
                out += start("reasoning")
            text += reasoning
            out.append(
                ev("response.reasoning_text.delta", **where(), content_index=0, delta=reasoning)
            )
        if content:
            if open_kind != "message":
                out += start("message")
            text += content
            fresh = chat_logprobs(job, choice.logprobs[logprobs_sent:])
            logprobs_sent = len(choice.logprobs)
            out.append(
                ev(
                    "response.output_text.delta",
                    **where(),
                    content_index=0,
                    delta=content,
                    logprobs=fresh["content"] if fresh else [],
                )
            )
        for call in calls:
            out += close()
            item = _call_item(call, "in_progress", arguments="")
            output.append(item)
            index = len(output) - 1
            out.append(ev("response.output_item.added", output_index=index, item=item))
            out.append(
                ev("response.function_call_arguments.delta", **where(), delta=call.arguments)
            )
            out.append(
                ev(
                    "response.function_call_arguments.done",
                    **where(),
                    arguments=call.arguments,
                    name=call.name,
                )
            )
            output[-1] = item | {"arguments": call.arguments, "status": "completed"}
            out.append(ev("response.output_item.done", output_index=index, item=output[-1]))
        return out

    def snapshot(status: str, usage=None, incomplete: str | None = None) -> dict:
        return rp.response(
            payload, job.id, job.created, job.spec.name, status, list(output), usage, incomplete
        )

    try:
        yield ev("response.created", response=snapshot("in_progress"))
        yield ev("response.in_progress", response=snapshot("in_progress"))
        async for _, delta in group:
            choice.feed(delta)
            if choice.finish_reason == "error":
                group.cancel()
                yield ev(
                    "error",
                    code="server_error",
                    message=f"Generation failed: {choice.error}",
                    param=None,
                )
                yield ev("response.failed", response=snapshot("failed"))
                return
            for frame in items(*choice.reader.take()):
                yield frame
            if choice.finish_reason is not None:
                break
        if not output:  # nothing was said: an empty message, as the full answer has
            for frame in start("message"):
                yield frame
        for frame in close():
            yield frame
        status, incomplete = _status(choice)
        body = snapshot(status, _usage(job, choice), incomplete)
        if payload.store:
            await _store(job, payload, history, key_id, body)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield ev(kind, response=body)
    finally:
        # Runs on normal end and on client disconnect (CancelledError): the slot is freed.
        group.cancel()
        job.note(group, [choice])


async def get_response(response_id: str, key_id: int | None) -> dict:
    return (await _stored(response_id, key_id)).body


async def delete_response(response_id: str, key_id: int | None) -> dict:
    row = await _stored(response_id, key_id)
    await row.adelete()
    return {"id": response_id, "object": "response.deleted", "deleted": True}
