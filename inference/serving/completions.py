"""POST /v1/completions: prompts as text or token ids, echo, a full or streamed answer."""

from __future__ import annotations

from django.http import StreamingHttpResponse

from inference import protocol
from inference.serving.base import (
    FINGERPRINT,
    Choice,
    Job,
    ModelDefaults,
    budget,
    encode_prompt,
    finite,
    load_model,
    resolve_model,
    run_to_end,
    sampling_params,
    stream_events,
    streaming_response,
    submit,
    token_texts,
)
from inference.types import RequestStats
from llmservice.errors import APIError


def completion_logprobs(
    job: Job, entries: list[tuple[int, float, tuple]], offset: int = 0
) -> dict | None:
    if not job.params.logprobs:
        return None
    texts = token_texts(job.model)
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    position = offset
    for token, logprob, top in entries:
        text, _ = texts.get(token)
        tokens.append(text)
        token_logprobs.append(finite(logprob))
        top_logprobs.append(
            {texts.get(t)[0]: finite(lp) for t, lp in top} if job.top_logprobs else None
        )
        text_offset.append(position)
        position += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs if job.top_logprobs else None,
        "text_offset": text_offset,
    }


async def prepare_completion(
    request: protocol.CompletionRequest,
    stats: RequestStats | None = None,
    allowed: tuple[str, ...] = (),
) -> Job:
    spec, defaults = await resolve_model(request.model, stats, allowed)
    model = await load_model(spec)
    raw = request.prompts()
    prompts = [encode_prompt(model, p) for p in raw]
    if any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    longest = max(len(p) for p in prompts)
    max_tokens = budget(
        model,
        spec,
        longest,
        request.max_new_tokens(),
        ModelDefaults(max_tokens=defaults.max_tokens if defaults.max_tokens is not None else 16),
        "prompt",
    )
    top = request.logprobs or 0
    params = sampling_params(
        request,
        defaults,
        max_tokens,
        logprobs=request.logprobs is not None,
        top_logprobs=top,
        vocab=len(model.tokenizer),
    )
    echo = []
    if request.echo:
        echo = [p if isinstance(p, str) else model.tokenizer.decode(p) for p in raw]
    return Job(
        kind="completion",
        id=protocol.new_id("cmpl"),
        created=protocol.now(),
        spec=spec,
        model=model,
        prompts=prompts,
        params=params,
        n=request.n or 1,
        stops=request.stop_list(),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        echo_texts=echo,
        top_logprobs=top,
        stats=stats,
    )


def _echo(job: Job, choice: Choice) -> str:
    return job.echo_texts[choice.index // job.n] if job.echo_texts else ""


async def completion_full(job: Job) -> dict:
    choices = await run_to_end(job)
    return protocol.text_completion(
        job.id,
        job.created,
        job.spec.name,
        [
            {
                "index": c.index,
                "text": _echo(job, c) + c.text,
                "logprobs": completion_logprobs(job, c.logprobs, len(_echo(job, c))),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        job.usage(sum(c.tokens for c in choices)),
        FINGERPRINT,
    )


async def completion_stream(job: Job) -> StreamingHttpResponse:
    echoed: set[int] = set()
    sent: dict[int, int] = {}

    def chunk(choice: Choice, text: str, final: bool) -> list[dict]:
        if choice.index not in echoed:
            echoed.add(choice.index)
            text = _echo(job, choice) + text
        logprobs = None
        if job.params.logprobs:
            start = sent.get(choice.index, 0)
            logprobs = completion_logprobs(job, choice.logprobs[start:])
            sent[choice.index] = len(choice.logprobs)
        body = protocol.text_completion(
            job.id,
            job.created,
            job.spec.name,
            [
                {
                    "index": choice.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason if final else None,
                }
            ],
            None,
            FINGERPRINT,
        )
        if job.include_usage:
            body["usage"] = None
        return [body]

    group = await submit(job)
    return streaming_response(stream_events(job, group, chunk, None), group)
