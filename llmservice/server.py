"""Daphne with an orderly stop: SIGTERM or SIGINT closes the listening sockets, lets the requests
in flight finish for up to a grace period, and only then stops the reactor (which cancels what is
left). Daphne's own handlers stop the reactor at once, cutting every stream mid-answer.

A second signal while draining stops at once, as a second Ctrl-C does elsewhere.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

from daphne.cli import CommandLineInterface
from daphne.server import Server
from twisted.internet import defer, reactor, tcp

from llmservice.lifecycle import lifecycle

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
# How long requests cut at the end of the grace period get to record themselves.
CUT_SECONDS = 10.0


class GracefulServer(Server):
    grace_seconds = 30.0

    def run(self) -> None:
        self.ports: list = []
        reactor.callWhenRunning(self._take_signals)
        super().run()

    def listen_success(self, port) -> None:
        self.ports.append(port)
        super().listen_success(port)

    def _take_signals(self) -> None:
        # After the reactor installed its own handlers (startup), so ours replace them.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        reactor.callFromThread(self.drain, signal.Signals(signum).name)

    def drain(self, reason: str) -> None:
        if lifecycle.draining:
            _say(f"{reason} again: stopping now")
            self.stop()
            return
        lifecycle.draining = True
        # Closed by the reactor on a later turn: the stop waits for them, or a reactor stopped
        # first would leave the sockets open (accepting into the backlog) until the process ends.
        self.closing = [d for d in (port.stopListening() for port in self.ports) if d is not None]
        _say(
            f"{reason}: not accepting connections; waiting up to {self.grace_seconds:g} s "
            f"for {lifecycle.in_flight} request(s) in flight"
        )
        self._wait_for_requests(time.monotonic() + self.grace_seconds)

    def _wait_for_requests(self, deadline: float, cut: bool = False) -> None:
        if lifecycle.in_flight and time.monotonic() < deadline:
            reactor.callLater(POLL_SECONDS, self._wait_for_requests, deadline, cut)
            return
        if lifecycle.in_flight and not cut:
            # Closing the connections is what a client leaving does: Django cancels the view, and
            # the request frees its slot and records its row. Stopping the reactor first would
            # cancel only Django's outer task and leave the view behind, its row unwritten.
            _say(f"grace period over: cancelling {lifecycle.in_flight} request(s)")
            for protocol in list(self.connections):
                if getattr(protocol, "transport", None) is not None:
                    protocol.transport.abortConnection()
            self._wait_for_requests(time.monotonic() + CUT_SECONDS, cut=True)
            return
        defer.DeferredList(self.closing).addBoth(lambda _: self.stop())


def _say(message: str) -> None:
    print(f"llm-service: {message}", file=sys.stderr, flush=True)


def send_at_once() -> None:
    """Twisted holds every write until the reactor's next turn: it registers the socket with
    epoll, waits for it to be writable, sends, and unregisters it. For a stream that is each SSE
    event of each answer, and every cycle is CPU taken from an engine sharing the cores (the
    llamacpp section of docs/benchmarks.md). A plain TCP write with nothing queued before it is
    sent at once; what the kernel does not take, and every other case, goes Twisted's way."""
    buffered_write, buffered_sequence = tcp.Connection.write, tcp.Connection.writeSequence

    def ready(conn) -> bool:
        return not (
            conn.TLS
            or conn.dataBuffer
            or conn._tempDataBuffer
            or conn.producerPaused  # HTTP channels register as the producer of their writes
            or conn.disconnecting
            or conn._writeDisconnected
            or not conn.connected
        )

    def write(self, data: bytes) -> None:
        if not ready(self) or not isinstance(data, bytes):
            return buffered_write(self, data)
        sent = self.writeSomeData(data)
        if isinstance(sent, BaseException):
            sent = 0  # the reactor finds the broken connection on its next write
        if sent < len(data):
            buffered_write(self, data[sent:])

    def write_sequence(self, iovec) -> None:
        if not ready(self):
            return buffered_sequence(self, iovec)
        try:
            data = b"".join(iovec)
        except TypeError:  # not all bytes: Twisted's own checks and errors
            return buffered_sequence(self, iovec)
        write(self, data)

    tcp.Connection.write = write
    tcp.Connection.writeSequence = write_sequence


def plain_http_module() -> None:
    """Daphne writes each body message through `twisted.web.http.Request.write`, and that module
    is a deprecation proxy whose every attribute lookup runs Python code: several times a plain
    lookup, once per streamed event. Daphne uses none of its deprecated names (HTTPClient), so
    its reference becomes the module itself."""
    from daphne import http_protocol
    from twisted.python.deprecate import _ModuleProxy

    if isinstance(http_protocol.http, _ModuleProxy):
        http_protocol.http = object.__getattribute__(http_protocol.http, "_module")


def run_daphne(args: list[str], grace_seconds: float) -> None:
    GracefulServer.grace_seconds = grace_seconds
    send_at_once()
    plain_http_module()
    cli = CommandLineInterface()
    cli.server_class = GracefulServer
    cli.run(args)
