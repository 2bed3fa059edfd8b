"""Legacy text completions through the openai SDK."""

from __future__ import annotations

import openai
import pytest

from tests.test_chat_completions import NO_EOS


def complete(client, prompt="Once upon a time", **kwargs):
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model="tiny", prompt=prompt, **kwargs)


def test_it_completes_text_in_openais_shape(client):
    reply = complete(client, extra_body=NO_EOS)
    assert reply.id.startswith("cmpl-")
    assert reply.object == "text_completion"
    assert reply.choices[0].text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8


def test_a_list_of_prompts_gets_a_choice_each(client):
    reply = complete(client, prompt=["One", "Two", "Three"], n=2, max_tokens=3)
    assert [c.index for c in reply.choices] == list(range(6))
    single = complete(client, prompt="Two", max_tokens=3)
    assert reply.choices[2].text == single.choices[0].text


def test_token_id_prompts_are_accepted(client):
    assert complete(client, prompt=[1, 2, 3, 4]).choices[0].text is not None


def test_echo_puts_the_prompt_before_the_completion(client):
    plain = complete(client, prompt="Hello world")
    echoed = complete(client, prompt="Hello world", echo=True)
    assert echoed.choices[0].text == "Hello world" + plain.choices[0].text


def test_completion_logprobs_use_the_legacy_shape(client):
    reply = complete(client, logprobs=2, max_tokens=4, extra_body=NO_EOS)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == reply.choices[0].text


def test_completions_stream_with_usage(client):
    chunks = list(
        complete(client, stream=True, stream_options={"include_usage": True}, extra_body=NO_EOS)
    )
    assert chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == complete(client, extra_body=NO_EOS).choices[0].text


def test_stop_works_for_completions_too(client):
    full = complete(client, max_tokens=30, temperature=1, seed=5, extra_body=NO_EOS).choices[0].text
    stop = full[8:11]
    reply = complete(client, max_tokens=30, stop=stop, temperature=1, seed=5, extra_body=NO_EOS)
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_prompts_sent_together_report_only_the_cached_tokens_they_reused(mlx_server):
    # mlx's own prefill groups (vLLM caches whole 128-token blocks: see the chat tests).
    client = mlx_server.openai()
    # Token ids, so the cached head is exactly a prefix. Once the head is cached, the two prompts
    # are prefilled together: the shorter takes 5 tokens back from its cached head, so its uncached
    # part matches the longer's, and its usage no longer counts those 5 as cached.
    head = [(7 * i) % 400 + 50 for i in range(40)]
    assert complete(client, prompt=head, max_tokens=1).usage.completion_tokens == 1
    short, long = head + [11, 12, 13], head + [21, 22, 23, 24, 25, 26, 27, 28]
    reply = complete(client, prompt=[short, long], max_tokens=2)
    assert reply.usage.prompt_tokens == len(short) + len(long)
    assert reply.usage.prompt_tokens_details.cached_tokens == 2 * len(head) - 5


def test_a_suffix_is_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="def f(", suffix="return 1", max_tokens=2)
    assert info.value.body["param"] == "suffix"
