"""Every error is JSON in OpenAI's shape, with the status clients expect."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import API_KEY


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def test_a_missing_key_gets_401(server):
    response = httpx.get(server.url + "/v1/models")
    assert_openai_error(response, 401, "invalid_api_key")


def test_a_wrong_key_gets_401_through_the_sdk(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.body["code"] == "invalid_api_key"


def test_an_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"


def test_an_unknown_route_gets_a_json_404(server):
    with server.http() as http:
        assert_openai_error(http.get("/v1/embeddingz"), 404)


def test_a_wrong_method_gets_a_json_405(server):
    with server.http() as http:
        error = assert_openai_error(http.delete("/v1/chat/completions"), 405)
    assert "POST" in error["message"]


def test_invalid_json_gets_400(server):
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
    assert_openai_error(response, 400)


@pytest.mark.parametrize(
    "body", [b"", b"[" * 50_000 + b"]" * 50_000, b'{"model":"tiny","messages":"\xff\xfe"}']
)
def test_no_body_deep_nesting_and_invalid_utf8_get_a_clear_400(server, body):
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
    error = assert_openai_error(response, 400)
    assert "None" not in error["message"]


def test_a_missing_field_is_named_in_param(server):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "tiny"})
    error = assert_openai_error(response, 400)
    assert error["param"] == "messages"


def test_a_prompt_over_the_context_gets_400_context_length_exceeded(server):
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi " * 3000}],
                "max_tokens": 10,
            },
        )
        error = assert_openai_error(response, 400, "context_length_exceeded")
        assert "maximum context length" in error["message"]
        too_many = http.post(
            "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10**7}
        )
        assert_openai_error(too_many, 400, "context_length_exceeded")


def test_models_are_listed_and_retrievable(client):
    ids = [m.id for m in client.models.list()]
    assert "tiny" in ids
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model" and model.owned_by
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


def test_image_parts_are_refused_clearly(server):
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ],
            },
        )
    error = assert_openai_error(response, 400)
    assert "not supported" in error["message"]


def test_health_and_ready_answer_without_a_key(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/ready").json()["database"] == "ok"


def test_static_files_are_served_without_a_key(server):
    response = httpx.get(server.url + "/static/admin/css/base.css")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/css")
    assert len(response.content) == int(response.headers["content-length"]) > 1000
    missing = httpx.get(server.url + "/static/no-such-file.css")
    assert missing.status_code == 404


def test_a_file_bigger_than_the_socket_takes_reaches_a_slow_reader_whole(mlx_server):
    """Writes go to the socket at once (llmservice/server.py); what the kernel does not take
    must still follow in order. A 4 KiB receive window makes the server's sends fall short."""
    import django.contrib.admin

    path = "admin/js/vendor/jquery/jquery.js"
    expected = (Path(django.contrib.admin.__file__).parent / "static" / path).read_bytes()
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.connect(("127.0.0.1", mlx_server.port))
        conn.sendall(
            f"GET /static/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        received = b""
        while data := conn.recv(1024):
            received += data
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(expected) > 200_000 and body == expected


def test_the_env_key_and_database_keys_both_work(server):
    created = server.manage("create_api_key", "--name", "second").stdout.strip()
    assert created.startswith("sk-llm-") and created != API_KEY
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=created, max_retries=0)
    assert any(m.id == "tiny" for m in client.models.list())


def test_a_body_over_the_size_limit_gets_a_413_before_parsing(server):
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            content=b'{"model": "tiny", "messages": [], "pad": "' + b"x" * (33 << 20) + b'"}',
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert "LLM_SERVICE_MAX_REQUEST_MB" in response.json()["error"]["message"]
        ok = http.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
            },
        )
        assert ok.status_code == 200


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
HOSTILE = [
    ("/v1/chat/completions", {**CHAT, "stop": [f"s{i}" for i in range(5000)]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "n": 10**9}, "n"),
    # OpenAI's own answer to this one: context_length_exceeded, about the messages.
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**12}, "maximum context length"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 10**6}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"28": 1e9}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"999999999": 5}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 1e300}, "presence_penalty"),
    ("/v1/completions", {"model": "tiny", "prompt": [999999999], "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [[1, -5]], "max_tokens": 4}, "prompt"),
]


@pytest.mark.parametrize(
    "path, body, param", HOSTILE, ids=[f"{p[4:]}-{param.split()[0]}" for p, _, param in HOSTILE]
)
def test_hostile_parameters_get_a_400_naming_them(server, path, body, param):
    with server.http() as http:
        response = http.post(path, json=body)
    error = assert_openai_error(response, 400)
    assert param in (error.get("param") or "") + error["message"], error


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_nan_and_infinite_numbers_get_a_400(server, literal):
    body = b'{"model":"tiny","messages":[{"role":"user","content":"Hi"}],"temperature":' + literal
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            content=body + b"}",
            headers={"Content-Type": "application/json"},
        )
    assert_openai_error(response, 400)


def test_raw_nul_bytes_get_a_400_and_escaped_ones_are_data(server):
    with server.http() as http:
        raw = http.post(
            "/v1/chat/completions",
            content=b'{"model":"tiny","messages":[{"role":"user","content":"a\x00b"}]}',
            headers={"Content-Type": "application/json"},
        )
        assert_openai_error(raw, 400)
        escaped = http.post(
            "/v1/chat/completions",
            json={**CHAT, "messages": [{"role": "user", "content": "a\u0000b"}]},
        )
    assert escaped.status_code == 200, escaped.text


def test_after_hostile_input_the_engine_answers_as_before(server):
    def answer() -> str:
        with server.http() as http:
            reply = http.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
        return reply.json()["choices"][0]["message"]["content"]

    before = answer()
    with server.http() as http:
        for path, body, _ in HOSTILE:
            http.post(path, json=body)
    assert answer() == before
    assert server.metric("llm_running_sequences") == 0
