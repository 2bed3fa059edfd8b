"""`POST /v1/chat/completions`, `POST /v1/completions`, `/v1/responses` and Anthropic's
`POST /v1/messages`."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import Router

from inference.anthropic_protocol import CountTokensRequest, MessagesRequest
from inference.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from inference.responses_protocol import ResponsesRequest
from inference.serving import chat, completions, embeddings, messages, responses
from llmservice.errors import documented

router = Router(tags=["inference"])


def _context(request: HttpRequest, stream: bool | None) -> dict:
    stats = getattr(request, "llm_stats", None)
    if stats is not None:
        stats.stream = bool(stream)
    caller = getattr(request, "auth", None)
    return {"stats": stats, "allowed": getattr(caller, "allowed_models", ())}


@router.post("/chat/completions", openapi_extra=documented(stream=True))
async def chat_completions(request: HttpRequest, payload: ChatCompletionRequest):
    job = await chat.prepare_chat(payload, **_context(request, payload.stream))
    if payload.stream:
        return await chat.chat_stream(job)
    return await chat.chat_full(job)


@router.post("/completions", openapi_extra=documented(stream=True))
async def text_completions(request: HttpRequest, payload: CompletionRequest):
    job = await completions.prepare_completion(payload, **_context(request, payload.stream))
    if payload.stream:
        return await completions.completion_stream(job)
    return await completions.completion_full(job)


@router.post("/embeddings", openapi_extra=documented())
async def create_embeddings(request: HttpRequest, payload: EmbeddingRequest):
    return await embeddings.create_embeddings(payload, **_context(request, False))


def _key_id(request: HttpRequest) -> int | None:
    caller = getattr(request, "auth", None)
    return getattr(caller, "key_id", None)


@router.post("/responses", openapi_extra=documented(stream=True))
async def create_response(request: HttpRequest, payload: ResponsesRequest):
    key = _key_id(request)
    job, history = await responses.prepare_response(
        payload, key, **_context(request, payload.stream)
    )
    if payload.stream:
        return await responses.response_stream(job, payload, history, key)
    return await responses.response_full(job, payload, history, key)


@router.get("/responses/{response_id}", openapi_extra=documented())
async def get_response(request: HttpRequest, response_id: str):
    return await responses.get_response(response_id, _key_id(request))


@router.delete("/responses/{response_id}", openapi_extra=documented())
async def delete_response(request: HttpRequest, response_id: str):
    return await responses.delete_response(response_id, _key_id(request))


@router.post("/messages", openapi_extra=documented(stream=True, anthropic=True))
async def anthropic_messages(request: HttpRequest, payload: MessagesRequest):
    job = await messages.prepare_messages(payload, **_context(request, payload.stream))
    if payload.stream:
        return await messages.messages_stream(job)
    return await messages.messages_full(job)


@router.post("/messages/count_tokens", openapi_extra=documented(anthropic=True))
async def anthropic_count_tokens(request: HttpRequest, payload: CountTokensRequest):
    return await messages.count_tokens(payload, **_context(request, False))
