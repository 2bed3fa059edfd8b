"""POST /v1/embeddings: inputs to tokens, the engine's vectors, OpenAI's list shape."""

from __future__ import annotations

import base64

import numpy as np

from inference import protocol
from inference.serving.base import engine, load_model, resolve_model, while_resident
from inference.types import RequestStats
from llmservice.errors import APIError


async def create_embeddings(
    payload: protocol.EmbeddingRequest,
    stats: RequestStats | None = None,
    allowed: tuple[str, ...] = (),
) -> dict:
    spec, _ = await resolve_model(payload.model, stats, allowed, kind="embedding")
    model = await load_model(spec)
    if payload.dimensions is not None and payload.dimensions != model.dimensions:
        raise APIError(
            400,
            f"Model `{spec.name}` makes {model.dimensions}-dimensional embeddings and cannot "
            f"shorten them to {payload.dimensions}.",
            param="dimensions",
        )
    vocab = len(model.tokenizer)
    inputs: list[list[int]] = []
    for index, item in enumerate(payload.inputs()):
        if isinstance(item, str):
            tokens = model.tokenizer.encode(item)
        else:
            if any(t < 0 or t >= vocab for t in item):
                raise APIError(
                    400, f"input[{index}]: token ids must be in [0, {vocab})", param="input"
                )
            tokens = list(item)
        if len(tokens) > model.context_length:
            raise APIError(
                400,
                f"input[{index}] is {len(tokens)} tokens; model `{spec.name}` takes at most "
                f"{model.context_length}.",
                param="input",
                code="context_length_exceeded",
            )
        inputs.append(tokens)
    prompt_tokens = sum(len(t) for t in inputs)
    if stats is not None:
        stats.prompt_tokens = prompt_tokens
    vectors = await while_resident(spec, lambda: engine().embed(spec, inputs))
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, payload.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": spec.name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector
