"""Stopping the server: SIGTERM and SIGINT close the door, let the answers in flight finish (up to
a grace period), write their analytics rows and stop the download worker; exit 0."""

from __future__ import annotations

import signal
import socket
import sqlite3

import httpx
import psutil
import pytest

from tests.helpers import Server, wait_until
from tests.test_chat_completions import NO_EOS

TOKENS = 120


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
    return not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_lets_the_answer_in_flight_finish_writes_its_row_and_exits_0(
    tmp_path, smollm_dir, signum
):
    server = Server(tmp_path, models=[("tiny", smollm_dir, True)], ready_timeout=300).start()
    processes = process_tree(server)
    try:
        with server.chat_stream("Count slowly", TOKENS, temperature=0, **NO_EOS) as events:
            assert next(events)["choices"][0]["delta"]["role"] == "assistant"
            server.proc.send_signal(signum)
            wait_until(lambda: refuses_connections(server), timeout=60)
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


def test_past_the_grace_period_a_stop_cuts_the_answer_and_records_it_cancelled(
    tmp_path, smollm_dir
):
    server = Server(
        tmp_path,
        models=[("tiny", smollm_dir, True)],
        env={"LLM_SERVICE_SHUTDOWN_GRACE_SECONDS": "0"},
        ready_timeout=300,
    ).start()
    try:
        with server.chat_stream("Count slowly", 5000, temperature=0, **NO_EOS) as events:
            next(events)
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                list(events)
        assert server.proc.wait(120) == 0
    finally:
        server.stop()
    assert "grace period over: cancelling 1 request(s)" in server.log()
    [(outcome, _, tokens)] = request_rows(server)
    assert outcome == "cancelled" and tokens < 5000


def test_a_server_that_is_draining_says_so_on_ready(tmp_path, smollm_dir):
    # /ready turns 503 the moment a stop begins, for load balancers on kept-alive connections.
    server = Server(tmp_path, models=[("tiny", smollm_dir, True)], ready_timeout=300).start()
    try:
        with server.http() as http:
            assert http.get("/ready").status_code == 200
            with server.chat_stream("Count slowly", TOKENS, temperature=0, **NO_EOS) as events:
                next(events)
                server.proc.send_signal(signal.SIGTERM)
                wait_until(lambda: refuses_connections(server), timeout=60)
                draining = http.get("/ready")
                list(events)
        assert server.proc.wait(120) == 0
    finally:
        server.stop()
    assert draining.status_code == 503 and draining.json() == {"status": "draining"}
