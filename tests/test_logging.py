"""What the server writes to its log: never a secret (API keys, HF_TOKEN, the admin password, the
metrics token), and the users' prompts and answers only when LLM_SERVICE_LOG_PROMPTS is set."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import API_KEY, Server
from tests.hub_server import HubServer
from tests.test_chat_completions import NO_EOS
from tests.test_downloads import REPO, hub_env

PROMPT = "Describe the purple elephant"
SECRETS = {
    "LLM_SERVICE_METRICS_TOKEN": "metrics-secret-5b1e",
    "LLM_SERVICE_ADMIN_PASSWORD": "admin-secret-77c2",
    "HF_TOKEN": "hf_secretTokenA9f3",
}


@pytest.fixture(scope="module")
def hub(tiny_dir):
    server = HubServer({REPO: tiny_dir}).start()
    yield server
    server.stop()


def exercise(server: Server) -> str:
    """Requests that handle every secret and carry the prompt; returns the answer."""
    client = server.openai()
    answer = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=16,
        extra_body=NO_EOS,  # long enough to be found only where it was written
    )
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, stream=True
    )
    assert list(stream)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        wrong = http.post(
            "/v1/chat/completions",
            headers={"Authorization": "Bearer sk-wrong-secret-31d7"},
            json={"model": "tiny", "messages": [{"role": "user", "content": PROMPT}]},
        )
        assert wrong.status_code == 401
        metrics = http.get(
            "/metrics", headers={"Authorization": f"Bearer {SECRETS['LLM_SERVICE_METRICS_TOKEN']}"}
        )
        assert metrics.status_code == 200
    return answer.choices[0].message.content


def test_secrets_prompts_and_answers_stay_out_of_the_log_at_debug_level(tmp_path, tiny_dir, hub):
    server = Server(
        tmp_path,
        models=[("tiny", tiny_dir, True)],
        env={**hub_env(hub), **SECRETS, "LLM_SERVICE_LOG_LEVEL": "debug"},
    )
    with server:
        answer = exercise(server)
        pulled = server.manage("pull_model", REPO, "--name", "pulled", "--wait", check=False)
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    # The token was used (the hub saw it), and the log shows the download but not the token.
    assert f"Bearer {SECRETS['HF_TOKEN']}" in {r.get("authorization") for r in hub.requests}
    log = server.log()
    assert "DEBUG" in log and "pulled" in log
    for secret in [*SECRETS.values(), API_KEY, "sk-wrong-secret-31d7"]:
        assert secret not in log
    assert PROMPT not in log
    assert len(answer.strip()) > 12 and answer.strip() not in log


def test_prompts_and_answers_are_logged_when_enabled(tmp_path, tiny_dir):
    server = Server(
        tmp_path,
        models=[("tiny", tiny_dir, True)],
        env={**SECRETS, "LLM_SERVICE_LOG_PROMPTS": "true"},
    )
    with server:
        answer = exercise(server)
    logged = [line for line in server.log().splitlines() if "llmservice.prompts" in line]
    assert len(logged) == 2  # the full answer and the stream; not the refused request
    assert all(PROMPT in line for line in logged)
    written = json.dumps(answer.strip(), ensure_ascii=False)[1:-1][:20]  # as the log escapes it
    assert any(written in line for line in logged)
    assert API_KEY not in server.log()
