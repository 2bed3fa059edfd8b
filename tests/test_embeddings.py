"""/v1/embeddings through the openai SDK: all-MiniLM-L6-v2 (a sentence-transformers folder from
PyPI) gives the vectors sentence-transformers gives, in both encodings, batched across requests;
models of the other kind answer a clear 400."""

from __future__ import annotations

import asyncio

import numpy as np
import openai
import pytest

from tests.conftest import BACKENDS
from tests.helpers import minilm_path

TEXTS = [
    "The cat sat on the mat.",
    "A feline rested on the rug.",
    "Quarterly revenue grew by eight percent.",
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device="cpu").encode(TEXTS)


@pytest.fixture(scope="session", params=[b for b in BACKENDS if b != "llamacpp"])
def server(request):
    """llama.cpp serves no embeddings: its test server runs all-MiniLM-L6-v2 on mlx, as the mlx
    one does, so these run on the others only."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def embed_client(server):
    return server.openai()


def test_vectors_equal_sentence_transformers(embed_client, reference):
    reply = embed_client.embeddings.create(model="minilm", input=TEXTS)
    assert reply.object == "list" and reply.model == "minilm"
    assert [d.index for d in reply.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in reply.data])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, reference, atol=2e-4)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # normalised
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 0


def test_base64_and_token_id_inputs_give_the_same_vectors(embed_client, server, reference):
    # The SDK asks for base64 by default and decodes it to floats.
    decoded = embed_client.embeddings.create(model="minilm", input=TEXTS[0])
    np.testing.assert_allclose(decoded.data[0].embedding, reference[0], atol=2e-4)
    raw = server.http().post(
        "/v1/embeddings",
        json={"model": "minilm", "input": TEXTS[0], "encoding_format": "base64"},
    )
    assert isinstance(raw.json()["data"][0]["embedding"], str)
    floats = server.http().post(
        "/v1/embeddings",
        json={"model": "minilm", "input": TEXTS[0], "encoding_format": "float"},
    )
    assert isinstance(floats.json()["data"][0]["embedding"], list)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(minilm_path()).encode(TEXTS[0])
    by_ids = embed_client.embeddings.create(model="minilm", input=[ids, ids])
    np.testing.assert_allclose(by_ids.data[1].embedding, reference[0], atol=2e-4)


def test_concurrent_requests_each_get_their_own_vectors(server, reference):
    async def main():
        client = server.async_openai()
        calls = [client.embeddings.create(model="minilm", input=t) for t in TEXTS * 4]
        return await asyncio.gather(*calls)

    replies = asyncio.run(main())
    for i, reply in enumerate(replies):
        np.testing.assert_allclose(reply.data[0].embedding, reference[i % 3], atol=2e-4)


def test_dimensions_the_model_cannot_give_and_overlong_inputs_are_400s(embed_client):
    same = embed_client.embeddings.create(model="minilm", input="x", dimensions=384)
    assert len(same.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as info:
        embed_client.embeddings.create(model="minilm", input="x", dimensions=128)
    assert info.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as info:
        embed_client.embeddings.create(model="minilm", input="word " * 400)
    assert info.value.body["code"] == "context_length_exceeded"


def test_a_model_of_the_other_kind_is_a_clear_400(embed_client):
    with pytest.raises(openai.BadRequestError) as info:
        embed_client.embeddings.create(model="tiny", input="x")
    assert "chat model" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        embed_client.chat.completions.create(
            model="minilm", messages=[{"role": "user", "content": "hi"}]
        )
    assert "embedding model" in info.value.body["message"]


def test_embedding_models_are_listed_and_imported_with_their_pooling(embed_client, server):
    assert "minilm" in {m.id for m in embed_client.models.list()}
    out = server.manage(
        "shell",
        "--no-imports",
        "-c",
        "from models_app.models import LLMModel; r = LLMModel.objects.get(name='minilm'); "
        "print(r.kind, r.pooling, r.normalize, LLMModel.objects.get(is_default=True).name)",
    ).stdout.split()
    assert out == ["embedding", "mean", "True", "tiny"]
