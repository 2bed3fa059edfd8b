"""Several models at once, LRU unloading, and per-model settings honoured by the API."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.helpers import Server, wait_until
from tests.test_chat_completions import NO_EOS


@pytest.fixture(scope="module")
def multi(tmp_path_factory, tiny_dir, tiny2_dir):
    srv = Server(
        tmp_path_factory.mktemp("multi"),
        models=[("a", tiny_dir, True), ("b", tiny2_dir, False), ("c", tiny_dir, False)],
        env={"LLM_SERVICE_MAX_LOADED_MODELS": "2"},
    )
    srv.start()
    yield srv
    srv.stop()


def chat(client, model, content="Hello", **kwargs):
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kwargs
    )


def test_concurrent_requests_to_two_models_both_succeed(multi):
    async def main():
        client = multi.async_openai()
        calls = [
            client.chat.completions.create(
                model=m,
                messages=[{"role": "user", "content": f"Hi {i}"}],
                max_tokens=30,
                temperature=0,
                extra_body=NO_EOS,
            )
            for i, m in enumerate(["a", "b"] * 3)
        ]
        return await asyncio.gather(*calls)

    replies = asyncio.run(main())
    assert [r.model for r in replies] == ["a", "b"] * 3
    assert all(r.usage.completion_tokens == 30 for r in replies)
    # Different weights, same prompt: the two models really are different models.
    client = multi.openai()
    sampled = {"temperature": 1.0, "seed": 3, "max_tokens": 20}
    assert (
        chat(client, "a", **sampled).choices[0].message.content
        != chat(client, "b", **sampled).choices[0].message.content
    )


def test_the_least_recently_used_model_is_unloaded_at_the_limit(multi):
    client = multi.openai()
    chat(client, "a")
    chat(client, "b")
    assert sorted(multi.loaded_models()) == ["a", "b"]
    chat(client, "a")  # now b is the least recently used
    chat(client, "c")
    assert sorted(multi.loaded_models()) == ["a", "c"]
    chat(client, "b")
    assert sorted(multi.loaded_models()) == ["b", "c"]


def test_the_model_list_follows_the_registry_live(multi):
    client = multi.openai()
    assert {"a", "b", "c"} <= {m.id for m in client.models.list()}
    chat(client, "c")
    assert "c" in multi.loaded_models()
    multi.set_model("c", enabled=False)
    try:
        assert "c" not in {m.id for m in client.models.list()}
        with pytest.raises(openai.NotFoundError):
            chat(client, "c")
        # A disabled model's memory is freed once a request names it.
        wait_until(lambda: "c" not in multi.loaded_models(), timeout=30)
    finally:
        multi.set_model("c", enabled=True)
    assert chat(client, "c").model == "c"


def test_aliases_name_the_same_model(multi):
    multi.set_model("b", aliases=["bee", "gpt-4o-mini"])
    client = multi.openai()
    assert chat(client, "gpt-4o-mini").model == "b"
    assert (
        chat(client, "bee").choices[0].message.content
        == chat(client, "b").choices[0].message.content
    )


def test_a_context_length_setting_takes_effect_on_the_next_request(multi):
    client = multi.openai()
    chat(client, "a", content="word " * 40)
    multi.set_model("a", context_length=32)
    try:
        with pytest.raises(openai.BadRequestError) as info:
            chat(client, "a", content="word " * 40)
        assert info.value.body["code"] == "context_length_exceeded"
        assert "32 tokens" in info.value.body["message"]
    finally:
        multi.set_model("a", context_length=None)


def test_a_context_length_setting_cannot_raise_the_models_own_limit(multi):
    client = multi.openai()
    multi.set_model("a", context_length=100_000)  # the tiny model knows 2048 positions
    try:
        with pytest.raises(openai.BadRequestError) as info:
            chat(client, "a", max_tokens=4000)
        assert info.value.body["code"] == "context_length_exceeded"
        assert "2048 tokens" in info.value.body["message"]
    finally:
        multi.set_model("a", context_length=None)


def test_default_sampling_settings_fill_what_the_request_leaves_out(multi):
    client = multi.openai()
    multi.set_model("a", default_max_tokens=3, default_temperature=0.0)
    try:
        reply = client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "Hi"}], extra_body=NO_EOS
        )
        assert reply.usage.completion_tokens == 3
        again = client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "Hi"}], extra_body=NO_EOS
        )
        assert again.choices[0].message.content == reply.choices[0].message.content  # greedy
        # The request's own value wins over the default.
        assert chat(client, "a", max_tokens=5, extra_body=NO_EOS).usage.completion_tokens == 5
    finally:
        multi.set_model("a", default_max_tokens=None, default_temperature=None)


def test_a_system_prompt_and_a_chat_template_override_change_the_prompt(multi):
    client = multi.openai()
    base = chat(client, "a").usage.prompt_tokens
    multi.set_model("a", system_prompt="You are a pirate. Always answer like a pirate. " * 5)
    try:
        assert chat(client, "a").usage.prompt_tokens > base
    finally:
        multi.set_model("a", system_prompt="")
    multi.set_model("a", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    try:
        assert chat(client, "a", content="Hello").usage.prompt_tokens == 1
    finally:
        multi.set_model("a", chat_template="")


def test_an_idle_model_is_unloaded_after_its_keep_alive(multi):
    client = multi.openai()
    multi.set_model("b", keep_alive_seconds=1)
    try:
        chat(client, "b")
        assert "b" in multi.loaded_models()
        wait_until(lambda: "b" not in multi.loaded_models(), timeout=10, interval=0.2)
    finally:
        multi.set_model("b", keep_alive_seconds=None)
    assert chat(client, "b").model == "b"  # and it loads again on demand


def test_a_model_that_cannot_load_answers_503_with_retry_after(multi, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"not weights")
    multi.manage("import_model", str(broken), "--name", "broken")
    with multi.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.json()["error"]["code"] == "model_load_failed"
    assert chat(multi.openai(), "a").model == "a"  # others keep working
