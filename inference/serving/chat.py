"""POST /v1/chat/completions: messages through the chat template, a full or streamed answer."""

from __future__ import annotations

from django.http import StreamingHttpResponse

from inference import protocol
from inference.constraints import ConstraintError, json_constraint
from inference.serving.base import (
    FINGERPRINT,
    Choice,
    Job,
    ModelDefaults,
    budget,
    load_model,
    render_chat,
    resolve_model,
    run_to_end,
    sampling_params,
    stream_events,
    streaming_response,
    submit,
    token_texts,
)
from inference.types import Constraint, RequestStats
from llmservice.errors import APIError


def chat_messages(request: protocol.ChatCompletionRequest, defaults: ModelDefaults) -> list[dict]:
    messages = [
        {"role": m.role if m.role != "developer" else "system", "content": m.text()}
        for m in request.messages
    ]
    if defaults.system_prompt:
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = defaults.system_prompt + "\n\n" + messages[0]["content"]
        else:
            messages.insert(0, {"role": "system", "content": defaults.system_prompt})
    return messages


def chat_logprobs(job: Job, entries: list[tuple[int, float, tuple]]) -> dict | None:
    if not job.params.logprobs:
        return None
    texts = token_texts(job.model)

    def item(token: int, logprob: float) -> dict:
        text, raw = texts.get(token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    content = []
    for token, logprob, top in entries:
        entry = item(token, logprob)
        entry["top_logprobs"] = [item(t, lp) for t, lp in top]
        content.append(entry)
    return {"content": content, "refusal": None}


async def prepare_chat(
    request: protocol.ChatCompletionRequest,
    stats: RequestStats | None = None,
    allowed: tuple[str, ...] = (),
) -> Job:
    spec, defaults = await resolve_model(request.model, stats, allowed)
    model = await load_model(spec)
    prompt = render_chat(model, spec, chat_messages(request, defaults))
    max_tokens = budget(model, spec, len(prompt), request.max_new_tokens(), defaults, "messages")
    top = request.top_logprobs or 0
    params = sampling_params(
        request,
        defaults,
        max_tokens,
        logprobs=bool(request.logprobs),
        top_logprobs=top,
        vocab=len(model.tokenizer),
    )
    return Job(
        kind="chat",
        id=protocol.new_id("chatcmpl"),
        created=protocol.now(),
        spec=spec,
        model=model,
        prompts=[prompt],
        params=params,
        n=request.n or 1,
        stops=request.stop_list(),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        top_logprobs=top,
        stats=stats,
        constraint=output_constraint(request, model),
    )


def output_constraint(request: protocol.ChatCompletionRequest, model) -> Constraint | None:
    """response_format as a constraint every backend enforces, or a 400 saying why not."""
    if not request.constrained():
        return None
    if not model.capabilities.constrained:
        raise APIError(
            400,
            f"Model `{request.model}`'s backend cannot constrain its output.",
            param="response_format",
        )
    try:
        return json_constraint(request.response_format.output_schema())
    except ConstraintError as exc:
        raise APIError(400, f"response_format: {exc}", param="response_format") from exc


async def chat_full(job: Job) -> dict:
    choices = await run_to_end(job)
    return protocol.chat_completion(
        job.id,
        job.created,
        job.spec.name,
        [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": chat_logprobs(job, c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        job.usage(sum(c.tokens for c in choices)),
        FINGERPRINT,
    )


async def chat_stream(job: Job) -> StreamingHttpResponse:
    usage_field = {"usage": None} if job.include_usage else {}
    sent: dict[int, int] = {}  # logprob entries already sent, per choice

    def frame(choices: list[dict]) -> dict:
        return (
            protocol.chat_chunk(job.id, job.created, job.spec.name, choices, FINGERPRINT)
            | usage_field
        )

    def first(index: int) -> dict:
        return frame(
            [
                {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )

    def chunk(choice: Choice, text: str, final: bool) -> dict:
        logprobs = None
        if job.params.logprobs:
            start = sent.get(choice.index, 0)
            logprobs = chat_logprobs(job, choice.logprobs[start:])
            sent[choice.index] = len(choice.logprobs)
        return frame(
            [
                {
                    "index": choice.index,
                    "delta": {"content": text} if text or not final else {},
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason if final else None,
                }
            ]
        )

    group = await submit(job)
    return streaming_response(stream_events(job, group, chunk, first), group)
