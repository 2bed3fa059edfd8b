"""One engine per server process, created lazily on first use.

The engine wraps the scheduler thread for asyncio callers: `await engine.load(spec)` and
`engine.submit(request)` -> a stream of TokenDelta to iterate with `async for`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from inference.backends import create_backend
from inference.backends.base import LoadedModel
from inference.scheduler import ModelBusy, QueueFull, Scheduler, Sink
from inference.types import GenerationRequest, ModelSpec, TokenDelta

__all__ = ["Engine", "EngineConfig", "GenerationGroup", "ModelBusy", "QueueFull", "get_engine"]


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "auto"
    max_queue: int = 64
    max_loaded_models: int = 1
    memory_budget_bytes: int = 0


class GenerationGroup:
    """Sequences generated together for one API request (n choices, several prompts).

    Iterate it for `(index, delta)` pairs until every sequence has finished; `cancel()` frees
    their batch slots at the scheduler's next step.
    """

    def __init__(self, engine: Engine, requests: list[GenerationRequest]) -> None:
        self._engine = engine
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._sinks: list[Sink] = []
        self._seq_ids: list[int] = []
        self.open: set[int] = set()
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        try:
            for index, request in enumerate(requests):
                sink = Sink(loop=loop, queue=self._queue, key=index)
                self._seq_ids.append(engine.scheduler.submit(request, sink))
                self._sinks.append(sink)
                self.open.add(index)
        except QueueFull:
            self.cancel()
            raise

    @property
    def queue_wait(self) -> float | None:
        admitted = [s.admitted_at for s in self._sinks if s.admitted_at is not None]
        return (min(admitted) - self.submitted_at) if admitted else None

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache, over the group's sequences."""
        return sum(s.cached_tokens for s in self._sinks)

    def __aiter__(self) -> GenerationGroup:
        return self

    async def __anext__(self) -> tuple[int, TokenDelta]:
        while True:
            if not self.open:
                raise StopAsyncIteration
            index, delta = await self._queue.get()
            if index in self.open:  # late deltas of a cancelled sequence are dropped
                break
        if self.first_token_at is None and delta.token is not None:
            self.first_token_at = time.monotonic()
        if delta.finish_reason is not None:
            self.open.discard(index)
        return index, delta

    def cancel(self, index: int | None = None) -> None:
        """Stop one sequence (e.g. it hit a stop string) or, with no index, all of them."""
        indexes = list(self.open) if index is None else [index]
        for i in indexes:
            if i in self.open and i < len(self._seq_ids):
                self.open.discard(i)
                self._engine.scheduler.cancel(self._seq_ids[i])


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.backend = create_backend(config.backend)
        self.scheduler = Scheduler(
            self.backend,
            max_queue=config.max_queue,
            max_loaded_models=config.max_loaded_models,
            memory_budget_bytes=config.memory_budget_bytes,
        )
        self.scheduler.start()

    async def load(self, spec: ModelSpec) -> LoadedModel:
        """Make `spec` resident (loading it if needed) and return it; waits, never times out."""
        model = self.scheduler.resident(spec)
        if model is not None:
            return model
        return await asyncio.wrap_future(self.scheduler.load(spec))

    async def unload(self, name: str) -> bool:
        return await asyncio.wrap_future(self.scheduler.unload(name))

    def submit(self, requests: list[GenerationRequest]) -> GenerationGroup:
        """Queue sequences together; raises QueueFull (submitting none) when the queue is full."""
        group = GenerationGroup(self, requests)
        announcement = _announcement.get()
        if announcement is not None:  # the request is in the queue now: no longer on its way
            announcement.end()
        return group

    def stats(self) -> dict:
        s = self.scheduler
        return {
            "backend": self.backend.name,
            "device": self.backend.device,
            "loaded_models": s.loaded(),
            "running": s.running,
            "queued": s.queued,
            "tokens_generated": s.tokens_generated,
            "started_at": s.started_at,
        }

    def shutdown(self) -> None:
        """Stop the scheduler thread and free the models (at exit: mlx aborts the process if its
        threads are still busy while the interpreter tears down)."""
        self.scheduler.stop()
        self.scheduler.close_models()


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine(config: EngineConfig | None = None) -> Engine:
    """The process's engine, created on first use (so management commands never load mlx)."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = Engine(config or EngineConfig())
                atexit.register(_engine.shutdown)
    return _engine


def current_engine() -> Engine | None:
    """The engine if one was started, without starting it."""
    return _engine


class _Announcement:
    def __init__(self, engine: Engine) -> None:
        self._scheduler: Scheduler | None = engine.scheduler
        self._scheduler.announce(1)

    def end(self) -> None:
        if self._scheduler is not None:
            self._scheduler.announce(-1)
            self._scheduler = None


_announcement: contextvars.ContextVar[_Announcement | None] = contextvars.ContextVar(
    "llm_service_announcement", default=None
)


@contextlib.contextmanager
def announced() -> Iterator[None]:
    """Around the whole handling of one generation request, from its arrival: tells the scheduler
    it is coming until `Engine.submit` queues it (or it fails), so a burst prefills together."""
    engine = current_engine()
    if engine is None:  # the first request starts the engine: nothing to wait for yet
        yield
        return
    announcement = _Announcement(engine)
    token = _announcement.set(announcement)
    try:
        yield
    finally:
        announcement.end()
        _announcement.reset(token)
