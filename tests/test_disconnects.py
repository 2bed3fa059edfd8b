"""A storm of clients leaving: 1,000 streamed requests dropped at random points (before the first
token, mid-prefill, mid-decode, mid tool call) leave nothing behind in the engine, no cache memory
grown, one `cancelled` analytics row each, and a server that answers the next request as before."""

from __future__ import annotations

import asyncio
import json
import random
import re
import sqlite3

import httpx

from tests.helpers import Server, wait_until
from tests.test_chat_completions import NO_EOS, ask
from tests.test_tools import TOOLS

CONCURRENCY = 24
# How many of the drops happen at each point. A forced tool call is the slow one: the tiny model's
# random choices are mostly refused by the grammar, which llama.cpp then applies to the whole
# vocabulary at each step. A tenth of the storm is enough to show that an abort there (with a
# grammar's state in the engine) leaves nothing behind too; it comes a few tokens into the call,
# as mid-decode ones do, and not after the whole call.
POINTS = {"before_first_token": 300, "mid_prefill": 300, "mid_decode": 300, "mid_tool_call": 100}
DROPS = sum(POINTS.values())
LONG_PROMPT = " ".join(f"word{i}" for i in range(300))


def labelled(server: Server, name: str, **labels: str) -> float | None:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return None


def body(point: str) -> dict:
    content = LONG_PROMPT if point == "mid_prefill" else "Go on forever"
    request = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 400,
        "stream": True,
        "temperature": 1,
        **NO_EOS,
    }
    if point == "mid_tool_call":
        # The call's text is held until it is whole; its tokens' logprobs come one by one.
        request.update(tools=TOOLS, tool_choice="required", logprobs=True)
    return request


async def drop(server: Server, key: str, point: str, rng: random.Random) -> None:
    """One request over a raw socket, closed at `point` without a word."""
    payload = json.dumps(body(point)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head + payload)
        await writer.drain()
        if point == "mid_prefill":
            await reader.readuntil(b"\r\n\r\n")  # the headers: the prompt is being prefilled
        elif point in ("mid_decode", "mid_tool_call"):
            wanted, seen, received = rng.randint(2, 20), 0, b""
            while seen < wanted:
                received += await more(reader, received)
                seen = received.count(b"data: ")
    finally:
        if point == "before_first_token":
            writer.close()  # FIN after the request: a reset could discard it unread
        else:
            writer.transport.abort()


async def more(reader: asyncio.StreamReader, received: bytes) -> bytes:
    data = await reader.read(4096)
    assert data, f"the answer ended before the point to drop it: {received[-300:]!r}"
    return data


async def storm(server: Server, key: str, points: list[str]) -> None:
    rng = random.Random(7)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(point: str) -> None:
        async with gate:
            await drop(server, key, point, rng)

    await asyncio.gather(*(one(p) for p in points))


def outcomes(server: Server, key_name: str) -> dict[str, int]:
    with sqlite3.connect(server.data_dir / "db.sqlite3") as db:
        rows = db.execute(
            "SELECT outcome, COUNT(*) FROM analytics_requestlog WHERE key_name = ? GROUP BY 1",
            (key_name,),
        ).fetchall()
    return dict(rows)


def idle(server: Server) -> bool:
    return (
        server.metric("llm_running_sequences") == 0
        and server.metric("llm_queued_requests") == 0
        and labelled(server, "llm_engine_requests", model="tiny") == 0
        and (labelled(server, "llm_cache_memory_bytes", model="tiny", cache="kv") or 0) == 0
    )


def test_a_thousand_dropped_streams_leave_nothing_behind(server: Server):
    key_name = f"storm-{server.port}"
    key = server.manage("create_api_key", "--name", key_name).stdout.strip()
    client = server.openai()
    before = ask(client, "Hello").choices[0].message.content
    wait_until(lambda: idle(server), timeout=60)
    prompt_cache = labelled(server, "llm_cache_memory_bytes", model="tiny", cache="prompt")

    points = [point for point, count in POINTS.items() for _ in range(count)]
    random.Random(3).shuffle(points)
    asyncio.run(storm(server, key, points))

    wait_until(lambda: idle(server), timeout=120, interval=0.2)
    assert labelled(server, "llm_cache_memory_bytes", model="tiny", cache="prompt") == prompt_cache
    wait_until(lambda: sum(outcomes(server, key_name).values()) >= DROPS, timeout=120)
    assert outcomes(server, key_name) == {"cancelled": DROPS}
    assert ask(client, "Hello").choices[0].message.content == before
