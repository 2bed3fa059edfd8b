"""Stopping the server: SIGTERM and SIGINT close the door, let the answers in flight finish (up to
a grace period), write their analytics rows and stop the download worker; exit 0. And crashing
it: after SIGKILL its worker ends too, and a restart finds a sound database and resumes the
download."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import sqlite3

import httpx
import psutil
import pytest

from tests.conftest import gguf_of, llamacpp_tested_here
from tests.helpers import CACHE, Server, ended, wait_until
from tests.hub_server import HubServer
from tests.test_chat_completions import NO_EOS
from tests.test_downloads import REPO, hub_env

# The answer in flight at the stop: long enough to be still running when the signal lands, on a
# much faster machine too; a slow one has all of GRACE_SECONDS to finish it.
TOKENS = 1000
GRACE_SECONDS = "300"


def refuses_connections(server: Server) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", server.port)) != 0


def request_rows(server: Server) -> list[tuple]:
    with sqlite3.connect(server.data_dir / "db.sqlite3") as db:
        return db.execute(
            "SELECT outcome, finish_reason, completion_tokens FROM analytics_requestlog"
        ).fetchall()


def process_tree(server: Server) -> list[psutil.Process]:
    return [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(True)]


def gone(processes: list[psutil.Process]) -> bool:
    return all(ended(p) for p in processes)


# Where llama.cpp is tested here, the model is served by it, so that the answer can be held at its
# start by stopping the runner process until the stop has begun: in flight, however slow the
# machine. Elsewhere (mlx), TOKENS makes it so.
FREEZABLE = llamacpp_tested_here()


def stop_test_server(tmp_path, tiny_dir, grace: str) -> Server:
    model = (
        ("tiny", gguf_of(tiny_dir, CACHE / "tiny.gguf"), True, {"backend": "llamacpp"})
        if FREEZABLE
        else ("tiny", tiny_dir, True)
    )
    env = {"LLM_SERVICE_SHUTDOWN_GRACE_SECONDS": grace}
    return Server(tmp_path, models=[model], env=env, ready_timeout=300).start()


@contextlib.contextmanager
def stopped_mid_answer(server: Server, signum: int):
    """A long streamed answer, in flight when `signum` stops the server and the server refuses
    connections; its events, which go on from there once read."""
    [runner] = [p for p in process_tree(server) if p.name() == "llama-server"] or [None]

    def rest(events):
        if FREEZABLE:
            runner.resume()
        yield from events

    if FREEZABLE:
        runner.suspend()
    with server.chat_stream("Count slowly", TOKENS, temperature=0, **NO_EOS) as events:
        try:
            assert next(events)["choices"][0]["delta"]["role"] == "assistant"
            server.proc.send_signal(signum)
            wait_until(lambda: refuses_connections(server), timeout=60)
            yield rest(events)
        finally:
            if FREEZABLE:
                runner.resume()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_lets_the_answer_in_flight_finish_writes_its_row_and_exits_0(
    tmp_path, tiny_dir, signum
):
    server = stop_test_server(tmp_path, tiny_dir, GRACE_SECONDS)
    processes = process_tree(server)
    try:
        with stopped_mid_answer(server, signum) as events:
            rest = list(events)
        assert server.proc.wait(120) == 0
    finally:
        server.stop()
    assert "1 request(s) in flight" in server.log()
    assert rest[-1] == "[DONE]"
    assert rest[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for e in rest[:-1] if e["choices"][0]["delta"].get("content")) == TOKENS
    assert request_rows(server) == [("ok", "length", TOKENS)]
    wait_until(lambda: gone(processes), timeout=30)


def test_past_the_grace_period_a_stop_cuts_the_answer_and_records_it_cancelled(tmp_path, tiny_dir):
    server = stop_test_server(tmp_path, tiny_dir, "0")
    try:
        with stopped_mid_answer(server, signal.SIGTERM) as events:
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                list(events)
        assert server.proc.wait(120) == 0
    finally:
        server.stop()
    assert "grace period over: cancelling 1 request(s)" in server.log()
    [(outcome, _, tokens)] = request_rows(server)
    assert outcome == "cancelled" and tokens < TOKENS


def test_a_server_that_is_draining_says_so_on_ready(tmp_path, tiny_dir):
    # /ready turns 503 the moment a stop begins, for load balancers on kept-alive connections.
    server = stop_test_server(tmp_path, tiny_dir, GRACE_SECONDS)
    try:
        with server.http() as http:
            assert http.get("/ready").status_code == 200
            with stopped_mid_answer(server, signal.SIGTERM) as events:
                draining = http.get("/ready")
                list(events)
        assert server.proc.wait(120) == 0
    finally:
        server.stop()
    assert draining.status_code == 503 and draining.json() == {"status": "draining"}


@pytest.fixture(scope="module")
def hub(tiny_dir):
    server = HubServer({REPO: tiny_dir}).start()
    yield server
    server.stop()


def query(server: Server, sql: str) -> list[tuple]:
    with sqlite3.connect(server.data_dir / "db.sqlite3") as db:
        return db.execute(sql).fetchall()


def test_after_kill_9_mid_traffic_and_mid_download_a_restart_is_consistent_and_resumes(
    tmp_path, tiny_dir, hub
):
    hub.reset()
    hub.throttle = 1_000_000
    env = hub_env(hub)
    first = Server(tmp_path, models=[("tiny", tiny_dir, True)], env=env).start()
    try:
        pulled = first.manage("pull_model", REPO, "--name", "pulled")
        [(download,)] = query(first, "SELECT id FROM models_app_download")
        for _ in range(5):
            first.openai().chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
        # Answered requests reach the database within about a second (the recorder's flush).
        wait_until(lambda: len(request_rows(first)) == 5, timeout=60)
        wait_until(lambda: hub.bytes_served("model.safetensors") > 1_000_000, timeout=60)
        hub.throttle = 20_000  # nearly stalled: still mid-file at the kill, however slow we are
        # The server, its download worker and the worker's embedded beat process.
        processes = wait_until(lambda: (tree := process_tree(first)) and len(tree) >= 3 and tree)
        with first.chat_stream("Count slowly", 1500, **NO_EOS) as events:
            next(events)
            first.proc.kill()  # SIGKILL mid-answer and mid-download: no cleanup at all
            first.proc.wait(30)
        wait_until(lambda: gone(processes), timeout=30)  # the worker did not outlive it
    finally:
        first.stop()
    assert "queued" in pulled.stdout

    assert query(first, "PRAGMA integrity_check") == [("ok",)]
    assert request_rows(first)[:5] == [("ok", "length", 4)] * 5
    on_disk = query(first, "SELECT bytes_done, status FROM models_app_download")[0]
    assert on_disk[1] == "running"

    hub.throttle = None
    with Server(tmp_path, env=env) as second:  # the same data dir, database and models
        wait_until(
            lambda: (
                query(second, f"SELECT status FROM models_app_download WHERE id={download}")
                == [("completed",)]
            ),
            timeout=120,
        )
        reply = second.openai().chat.completions.create(
            model="pulled", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
    ranges = hub.ranges("model.safetensors")
    assert len(ranges) == 2 and ranges[0] is None, (ranges, hub.requests)
    assert re.fullmatch(r"bytes=\d+-", ranges[1]) and ranges[1] != "bytes=0-"  # resumed
