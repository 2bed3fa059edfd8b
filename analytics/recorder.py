"""Recording requests without slowing them: rows are buffered in memory and written in batches.

A request's `finally` hands its numbers to `record()` (a deque append, no I/O). A background thread
writes the buffer with one `bulk_create` per second, and once more at exit, so a crash loses at most
the last second and a clean shutdown loses nothing. Prometheus metrics are updated at the same time.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime

from django.db import close_old_connections, transaction

from analytics import metrics, rollup
from inference.types import RequestStats
from llmservice.ratelimit import limiter

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0


class Recorder:
    def __init__(self, interval: float = FLUSH_INTERVAL) -> None:
        self.interval = interval
        self._buffer: deque = deque()
        self._lock = threading.Lock()  # one flush at a time (timer thread vs. exit)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def record(self, stats: RequestStats) -> None:
        if stats.recorded:
            return
        stats.recorded = True
        ended = time.monotonic()
        latency = ended - stats.started
        ttft = (stats.first_token_at - stats.started) if stats.first_token_at else None
        decode_tps = None
        if stats.first_token_at and stats.completion_tokens > 1 and ended > stats.first_token_at:
            decode_tps = (stats.completion_tokens - 1) / (ended - stats.first_token_at)
        outcome = stats.outcome()
        row = {
            "created_at": datetime.fromtimestamp(stats.created_at, UTC),
            "api_key_id": stats.key_id,
            "key_name": stats.key_name,
            "model": stats.model,
            "endpoint": stats.endpoint,
            "stream": stats.stream,
            "status_code": stats.status_code,
            "outcome": outcome,
            "error_type": stats.error_type,
            "finish_reason": stats.finish_reason,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "ttft_ms": ttft * 1000 if ttft is not None else None,
            "latency_ms": latency * 1000,
            "queue_ms": stats.queue_wait * 1000 if stats.queue_wait is not None else None,
            "tokens_per_second": decode_tps,
        }
        self._buffer.append(row)
        metrics.observe_request(row)
        limiter.add_tokens(stats.key_id, stats.prompt_tokens + stats.completion_tokens)
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="analytics-recorder", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.flush()
            except Exception:
                log.exception("writing request analytics failed; will retry")

    def flush(self) -> int:
        """Write what is buffered; returns the number of rows written."""
        from analytics.models import RequestLog

        with self._lock:
            rows = []
            while self._buffer:
                rows.append(self._buffer.popleft())
            if not rows:
                return 0
            try:
                close_old_connections()
                with transaction.atomic():
                    objects = RequestLog.objects.bulk_create(
                        [RequestLog(**r) for r in rows], batch_size=500
                    )
                    rollup.add_rows(objects)
            except Exception:
                # Put them back in order for the next attempt rather than lose them.
                self._buffer.extendleft(reversed(rows))
                raise
            finally:
                close_old_connections()
            return len(rows)


recorder = Recorder()


@atexit.register
def _flush_at_exit() -> None:
    try:
        recorder.flush()
    except Exception:
        log.exception("final analytics flush failed")
