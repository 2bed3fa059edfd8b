"""With LLM_SERVICE_REDIS_URL, a key's limits hold across server processes (a real Redis)."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import Server
from tests.test_analytics import make_key


def test_a_keys_request_limit_is_shared_by_two_servers_through_redis(tmp_path, redis_url, tiny_dir):
    database = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    env = {"LLM_SERVICE_REDIS_URL": redis_url, "LLM_SERVICE_DATABASE_URL": database}
    with Server(tmp_path / "a", models=[("tiny", tiny_dir, True)], env=env) as first:
        key = make_key(first, "shared", rpm_limit=2)
        with Server(tmp_path / "b", env=env) as second:
            clients = [
                openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
                for s in (first, second)
            ]
            for client in clients:  # one request on each server: the limit's two
                client.models.list()
            for client in clients:  # a third, on either server, is over it
                with pytest.raises(openai.RateLimitError) as info:
                    client.models.list()
                assert int(info.value.response.headers["Retry-After"]) >= 1
