"""What the ASGI app and the server (llmservice/server.py) share: the HTTP requests in flight,
and whether a stop is draining them. Apart from server.py, which imports daphne (importing it
installs Twisted's reactor), so the app and its views can read it anywhere."""

from __future__ import annotations


class Lifecycle:
    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False


lifecycle = Lifecycle()
