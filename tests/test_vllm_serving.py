"""What only the vLLM backend's server shows: two vLLM engines resident, a model vLLM cannot load,
an engine core that dies. The API's behaviours common to every backend are in the other files,
parametrized over backends (the `server` fixture)."""

from __future__ import annotations

import contextlib
import json

import psutil
import pytest

from tests.conftest import VLLM, vllm_tested_here
from tests.helpers import ended, wait_until
from tests.test_chat_completions import NO_EOS

pytestmark = pytest.mark.skipif(not vllm_tested_here(), reason="vLLM is for Linux and CUDA only")


@pytest.mark.real_model
def test_two_models_are_resident_on_vllm_at_once_each_with_its_engine(vllm_server):
    client = vllm_server.openai()
    for model in ("tiny", "smollm2"):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert reply.model == model
    ready = vllm_server.http().get("/ready").json()
    assert {"tiny", "smollm2"} <= set(ready["loaded_models"])  # others' tests may load more
    assert ready["backends"]["tiny"] == ready["backends"]["smollm2"] == "vllm"


def test_a_model_vllm_cannot_load_answers_503_with_vllms_reason(vllm_server, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    (broken / "model.safetensors").write_bytes(b"not weights")
    vllm_server.manage("import_model", str(broken), "--name", "broken-vllm")
    vllm_server.set_model("broken-vllm", **VLLM)
    with vllm_server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": "broken-vllm", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "config.json" in error["message"]  # vLLM's own words about the file
    reply = vllm_server.openai().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content is not None  # the others keep working


def test_a_dead_engine_core_errors_its_answer_is_replaced_and_ends_when_its_model_unloads(
    vllm_server, tiny_vllm_dir
):
    # A model of its own, so that the engine killed here is no other test's. It unloads once
    # idle for a while, which frees its place among the resident models for the tests after
    # and is the last thing tested here.
    vllm_server.manage("import_model", str(tiny_vllm_dir), "--name", "fragile")
    vllm_server.set_model("fragile", **VLLM, keep_alive_seconds=30)
    server = psutil.Process(vllm_server.proc.pid)

    def engine_cores() -> set[int]:
        found = set()
        for p in server.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                title = " ".join(p.cmdline())  # vLLM names it "VLLM::EngineCore"
                if "EngineCore" in title and p.status() != psutil.STATUS_ZOMBIE:
                    found.add(p.pid)
        return found

    others = engine_cores()
    client = vllm_server.openai()
    hi = [{"role": "user", "content": "Hi"}]
    client.chat.completions.create(model="fragile", messages=hi, max_tokens=1)  # loaded
    [core] = engine_cores() - others
    events = []
    body = {"model": "fragile", "messages": hi, "max_tokens": 1500, "stream": True, **NO_EOS}
    with vllm_server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    if len(events) == 2:
                        psutil.Process(core).kill()
    assert "choices" in events[1]  # the answer had begun
    error = events[-1]["error"]
    assert "vLLM's engine core exited (killed by SIGKILL)" in error["message"]
    assert error["type"] == "server_error"
    reply = client.chat.completions.create(model="fragile", messages=hi, max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")
    [new_core] = engine_cores() - others - {core}  # a new engine core serves it
    engine = [psutil.Process(new_core), *psutil.Process(new_core).children(recursive=True)]
    assert len(engine) > 1  # the engine core and its worker

    # Idle past its keep-alive, the model is closed, and its engine's processes end with it.
    wait_until(lambda: all(ended(p) for p in engine), timeout=300, interval=0.5)
