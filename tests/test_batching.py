"""Continuous batching seen from clients: shared batches, joining mid-flight, freeing slots."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import BACKENDS, VLLM
from tests.helpers import API_KEY, Server, demo_gguf_path, sse_events, wait_until
from tests.test_chat_completions import NO_EOS


async def timed_stream(
    client: openai.AsyncOpenAI, prompt: str, max_tokens: int, started: asyncio.Event | None = None
) -> dict:
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body=NO_EOS,
    )
    times, text = [], ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.monotonic())
            text += chunk.choices[0].delta.content
            if started is not None:
                started.set()
        # Chunks already buffered are read without suspending: on a loaded machine this stream
        # could hold the client's loop to its end, and the other request's answer, there long
        # before, would be seen only then.
        await asyncio.sleep(0)
    return {"first": times[0], "last": times[-1], "text": text}


def test_concurrent_streams_share_one_batch(server):
    """Eight answers far longer than the test reads: once each has given its first token, they
    are running side by side (a server taking them in turn would be running one)."""

    async def first_token(client: openai.AsyncOpenAI, i: int, streams: list) -> str:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Story {i}"}],
            max_tokens=1800,
            temperature=0,
            stream=True,
            extra_body=NO_EOS,
        )
        streams.append(stream)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                return chunk.choices[0].delta.content
        return ""

    async def main() -> tuple[list[str], float]:
        client, streams = server.async_openai(), []
        try:
            firsts = await asyncio.gather(*(first_token(client, i, streams) for i in range(8)))
            return firsts, server.metric("llm_running_sequences")
        finally:
            for stream in streams:
                await stream.close()

    firsts, running = asyncio.run(main())
    assert all(firsts)
    assert running >= 2


def test_concurrent_answers_match_the_same_answers_alone(server, client):
    async def main():
        c = server.async_openai()
        return await asyncio.gather(
            *(
                c.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": f"Tell me about {i}"}],
                    max_tokens=10,
                    temperature=0,
                )
                for i in range(4)
            )
        )

    together = [r.choices[0].message.content for r in asyncio.run(main())]
    alone = [
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Tell me about {i}"}],
            max_tokens=10,
            temperature=0,
        )
        .choices[0]
        .message.content
        for i in range(4)
    ]
    assert together == alone


def test_a_new_request_joins_a_running_batch(server):
    async def main():
        client = server.async_openai()
        decoding = asyncio.Event()
        long = asyncio.create_task(timed_stream(client, "A long story", 1500, decoding))
        await decoding.wait()  # the long stream is decoding now
        short = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Quick"}],
            max_tokens=5,
            temperature=0,
            extra_body=NO_EOS,
        )
        short_done = time.monotonic()
        return await long, short, short_done

    long, short, short_done = asyncio.run(main())
    assert short.choices[0].finish_reason == "length"
    # The short request did not wait for the long one to finish.
    assert short_done < long["last"]


def test_a_disconnected_client_frees_its_slot(server):
    base = server.metric("llm_generated_tokens_total")
    with server.chat_stream("Go on forever", 1500, temperature=0, **NO_EOS) as events:
        for _ in range(5):
            next(events)
        assert server.metric("llm_running_sequences") == 1
    # Connection closed after a few tokens: the sequence leaves the batch.
    wait_until(lambda: server.metric("llm_running_sequences") == 0, timeout=30)
    generated = server.metric("llm_generated_tokens_total") - base
    time.sleep(0.5)
    assert server.metric("llm_generated_tokens_total") - base == generated
    assert generated < 1500


@pytest.fixture(scope="module", params=BACKENDS)
def small_server(request, tmp_path_factory, smollm_dir):
    """A server with room for one running sequence and one waiting request.

    It serves the real 135M model under the name `tiny`: a 1,500-token answer is still running
    (minutes on mlx, about half a minute on vLLM here) while the test fills the queue.
    """
    path, fields = {
        "mlx": (smollm_dir, {}),
        "vllm": (smollm_dir, VLLM),
        "llamacpp": (demo_gguf_path(), {"backend": "llamacpp"}),
    }[request.param]
    srv = Server(
        tmp_path_factory.mktemp("small"),
        models=[("tiny", path, True, fields)],
        env={"LLM_SERVICE_MAX_QUEUE": "1", "LLM_SERVICE_MAX_BATCH_SIZE": "1"},
        ready_timeout=600,
    )
    srv.start()
    yield srv
    srv.stop()


def test_a_full_queue_answers_429_with_retry_after(small_server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Long"}],
        "max_tokens": 1500,
        "stream": True,
        **NO_EOS,
    }
    started = threading.Event()
    release = threading.Event()

    def hold_stream():
        # `events` stays referenced: dropping the iterator would close the stream.
        with small_server.chat_stream("Long", 1500, **NO_EOS) as events:
            next(events)
            started.set()
            release.wait(30)

    holders = [threading.Thread(target=hold_stream) for _ in range(2)]
    holders[0].start()
    assert started.wait(30)
    started.clear()
    holders[1].start()  # this one waits in the queue
    try:
        # The first is decoding and the second waits (the first may still be prefilling when
        # the second is sent: then the queued one is the first).
        wait_until(
            lambda: (
                small_server.metric("llm_running_sequences") == 1
                and small_server.metric("llm_queued_requests") == 1
            ),
            timeout=60,
        )
        with small_server.http() as http:
            response = http.post("/v1/chat/completions", json={**body, "stream": False})
        assert response.status_code == 429
        assert response.headers["Retry-After"]
        assert response.json()["error"]["type"] == "rate_limit_exceeded"
        client = small_server.openai()
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}]
            )
    finally:
        release.set()
        for t in holders:
            t.join(30)
    # Once the holders are gone, the server serves again.
    wait_until(lambda: small_server.metric("llm_running_sequences") == 0, timeout=10)
    reply = small_server.openai().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert reply.choices[0].message.content is not None


def test_streams_over_raw_http_end_with_done(server):
    with (
        server.http() as http,
        http.stream(
            "POST",
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": "Hi",
                "max_tokens": 3,
                "stream": True,
            },
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    assert all(isinstance(e, dict) for e in events[:-1])


def test_ttft_is_not_blocked_by_a_slow_reader(server):
    """A client that reads slowly does not hold the batch back for others."""
    with server.chat_stream("slow reader", 100, **NO_EOS) as events:
        next(events)
        reply = server.openai().chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "fast"}],
            max_tokens=20,
            extra_body=NO_EOS,
        )
        assert reply.usage.completion_tokens == 20


async def _one_of_a_burst(http: httpx.AsyncClient, stream: bool) -> tuple[int, str | None, bool]:
    """(status, Retry-After, whether a 200 came whole) for one request of an overload burst."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Count"}],
        "max_tokens": 8,
        "stream": stream,
        **NO_EOS,
    }
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        text = (await response.aread()).decode()
        whole = (text.rstrip().endswith("data: [DONE]")) if stream else '"choices"' in text
        return response.status_code, response.headers.get("Retry-After"), whole


def test_ten_times_the_queue_at_once_gets_answers_or_429s_and_the_server_recovers(small_server):
    # small_server admits one running and one waiting request: twenty at once is ten times that.
    async def burst():
        async with httpx.AsyncClient(
            base_url=small_server.url,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=600,
            limits=httpx.Limits(max_connections=40),
        ) as http:
            return await asyncio.gather(*(_one_of_a_burst(http, i % 2 == 0) for i in range(20)))

    results = asyncio.run(burst())  # a dropped connection or a hang would raise here
    statuses = sorted({status for status, _, _ in results})
    assert set(statuses) <= {200, 429, 503}, statuses
    assert 200 in statuses and 429 in statuses
    assert all(whole for status, _, whole in results if status == 200)
    assert all(retry for status, retry, _ in results if status != 200)
    # At once, without waiting for Retry-After: nothing is left over from the burst.
    assert small_server.metric("llm_running_sequences") == 0
    assert small_server.metric("llm_queued_requests") == 0
    reply = small_server.openai().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_idle_slow_and_never_reading_clients_do_not_starve_others(server):
    """Slowloris (headers that never end), bodies that never arrive, and streams that are never
    read hold sockets, not the server: a normal request beside them answers."""
    idle, streams = [], []
    try:
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            if i % 2:  # headers done, a body promised and never sent
                s.sendall(b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            idle.append(s)
        payload = json.dumps(
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "never read"}],
                "max_tokens": 400,
                "stream": True,
                **NO_EOS,
            }
        ).encode()
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n".encode()
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            streams.append(s)  # never read from
        reply = server.openai().chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "I am here too"}],
            max_tokens=20,
            temperature=0,
            extra_body=NO_EOS,
        )
        assert reply.usage.completion_tokens == 20
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    finally:
        for s in idle + streams:
            s.close()
    wait_until(lambda: server.metric("llm_running_sequences") == 0, timeout=120)
