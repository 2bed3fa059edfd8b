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
from twisted.internet import reactor

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
        for port in self.ports:
            port.stopListening()
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
        self.stop()


def _say(message: str) -> None:
    print(f"llm-service: {message}", file=sys.stderr, flush=True)


def run_daphne(args: list[str], grace_seconds: float) -> None:
    GracefulServer.grace_seconds = grace_seconds
    cli = CommandLineInterface()
    cli.server_class = GracefulServer
    cli.run(args)
