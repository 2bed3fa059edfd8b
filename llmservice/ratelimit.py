"""Per-key requests-per-minute and tokens-per-minute limits over a sliding 60-second window.

Counts live in this process's memory: right for the single-process server `llm-service serve`
runs. Several server processes behind a balancer would each enforce the limits separately.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

WINDOW = 60.0


class Limiter:
    def __init__(self) -> None:
        self._requests: dict[int, deque[float]] = defaultdict(deque)
        self._tokens: dict[int, deque[tuple[float, int]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, key_id: int, rpm: int | None, tpm: int | None) -> tuple[str, float] | None:
        """Admit one request, or say which limit it hits and how many seconds until it frees."""
        now = time.monotonic()
        with self._lock:
            requests = self._requests[key_id]
            while requests and requests[0] <= now - WINDOW:
                requests.popleft()
            tokens = self._tokens[key_id]
            while tokens and tokens[0][0] <= now - WINDOW:
                tokens.popleft()
            if rpm is not None and len(requests) >= rpm:
                return "requests", requests[0] + WINDOW - now
            if tpm is not None and sum(n for _, n in tokens) >= tpm:
                return "tokens", tokens[0][0] + WINDOW - now
            requests.append(now)
            return None

    def add_tokens(self, key_id: int | None, count: int) -> None:
        if key_id is None or count <= 0:
            return
        with self._lock:
            self._tokens[key_id].append((time.monotonic(), count))


limiter = Limiter()
