"""The engine: the only door into loaded models. One per server process, created on first use.

`await engine.load(spec)` makes a model resident (through the residency manager, on the backend
the spec names); `engine.submit(spec, requests)` starts their sequences and returns a
GenerationGroup to iterate with `async for`; `engine.stats()` is a typed snapshot. Backends are
created lazily by name, so a process only imports the engines it serves with.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

from inference.backends import create_backend, resolve_backend_name
from inference.backends.base import Backend, EmbeddingModel, LoadedModel, ModelBusy, QueueFull
from inference.residency import ResidencyManager, ResidentInfo
from inference.types import GenerationRequest, ModelSpec, TokenDelta

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "GenerationGroup",
    "ModelBusy",
    "NotResident",
    "QueueFull",
    "get_engine",
]


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "auto"
    max_queue: int = 64
    max_loaded_models: int = 1
    memory_budget_bytes: int = 0
    # The llamacpp backend's: its llama-server binary, threads, and where it keeps tokenizers
    llama_server: str = ""
    llamacpp_threads: int = 0
    cache_dir: str = ""


@dataclass(frozen=True)
class EngineStats:
    backend: str  # what `auto` resolves to here
    device: str
    backends: dict[str, str]  # each started backend's device
    loaded_models: list[ResidentInfo]
    running: int
    queued: int
    tokens_generated: int
    started_at: float


class NotResident(Exception):
    """The model was unloaded between its load and this submit: load it again."""


class GenerationGroup:
    """Sequences generated together for one API request (n choices, several prompts).

    Iterate it for `(index, delta)` pairs until every sequence has finished; `cancel()` aborts
    the ones still running (their batch slots are freed at the engine's next step).
    """

    def __init__(self, engine: Engine, model: LoadedModel, requests: list[GenerationRequest]):
        self._engine = engine
        self.model = model
        self._ids = [r.request_id for r in requests]
        self._streams: list[AsyncIterator[TokenDelta]] = []
        self.open: set[int] = set()
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.cached_tokens = 0  # prompt tokens served from the prefix cache, over the group
        self.queue_wait: float | None = None  # the longest wait for a batch slot, if reported
        self._released = False
        self._queue: asyncio.Queue | None = None
        self._pumps: list[asyncio.Task] = []
        try:
            for index, request in enumerate(requests):
                self._streams.append(model.generate(request))
                self.open.add(index)
        except BaseException:
            self._released = True  # the engine releases the model for a group never made
            self.cancel()
            raise
        if len(self._streams) > 1:  # several sequences: merge them in arrival order
            self._queue = asyncio.Queue()
            self._pumps = [
                asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(self._streams)
            ]

    async def _pump(self, index: int, stream: AsyncIterator[TokenDelta]) -> None:
        try:
            async for delta in stream:
                self._queue.put_nowait((index, delta))
        except Exception as exc:
            self._queue.put_nowait((index, TokenDelta(None, finish_reason="error", error=str(exc))))

    def __aiter__(self) -> GenerationGroup:
        return self

    async def __anext__(self) -> tuple[int, TokenDelta]:
        while True:
            if not self.open:
                self._release()
                raise StopAsyncIteration
            if self._queue is None:
                index = 0
                try:
                    delta = await anext(self._streams[0])
                except StopAsyncIteration:
                    delta = TokenDelta(None, finish_reason="error", error="stream ended early")
            else:
                index, delta = await self._queue.get()
            if index in self.open:  # late deltas of a cancelled sequence are dropped
                break
        if delta.cached_tokens:
            self.cached_tokens += delta.cached_tokens
        if delta.queue_wait is not None:
            self.queue_wait = max(self.queue_wait or 0.0, delta.queue_wait)
        if self.first_token_at is None and (delta.token is not None or delta.text):
            self.first_token_at = time.monotonic()
        if delta.finish_reason is not None:
            self.open.discard(index)
            if not self.open:
                self._release()
        return index, delta

    def cancel(self, index: int | None = None) -> None:
        """Stop one sequence (e.g. it hit a stop string) or, with no index, all of them."""
        indexes = list(self.open) if index is None else [index]
        for i in indexes:
            if i in self.open:
                self.open.discard(i)
                self.model.abort(self._ids[i])
        if not self.open:
            for task in self._pumps:
                task.cancel()
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._engine.residency.release(self.model)


class Engine:
    def __init__(self, config: EngineConfig, backends: dict[str, Backend] | None = None) -> None:
        """`backends` gives ready backends by name (tests); others are created on first use."""
        self.config = config
        self._backends: dict[str, Backend] = dict(backends or {})
        self.default_backend = (
            config.backend
            if config.backend in self._backends
            else resolve_backend_name(config.backend)
        )
        self._backends_lock = threading.Lock()
        self.started_at = time.time()
        self.residency = ResidencyManager(
            self.backend_for,
            max_loaded_models=config.max_loaded_models,
            memory_budget_bytes=config.memory_budget_bytes,
        )

    def backend_name(self, spec: ModelSpec) -> str:
        if spec.backend in ("", "auto"):
            return self.default_backend
        return spec.backend

    def _resolved(self, spec: ModelSpec) -> ModelSpec:
        """`auto` made concrete, so the residency key knows which engine it names."""
        name = self.backend_name(spec)
        return spec if spec.backend == name else replace(spec, backend=name)

    def backend_for(self, spec: ModelSpec) -> Backend:
        name = self.backend_name(spec)
        with self._backends_lock:
            if name not in self._backends:
                options: dict = {"max_queue": self.config.max_queue}
                if name == "llamacpp":
                    options |= {
                        "server": self.config.llama_server or None,
                        "threads": self.config.llamacpp_threads,
                        "cache_dir": self.config.cache_dir or None,
                    }
                self._backends[name] = create_backend(name, **options)
            return self._backends[name]

    async def load(self, spec: ModelSpec) -> LoadedModel:
        """Make `spec` resident (loading it if needed) for a request about to start on it, and
        return it; waits, never times out."""
        spec = self._resolved(spec)
        # Held for the request until it starts on the model (submit / embed).
        model = self.residency.resident(spec, hold=True)
        if model is not None:  # the request path: no hop through a future when loaded
            return model
        return await asyncio.wrap_future(self.residency.load(spec, hold=True))

    def unhold(self, spec: ModelSpec) -> None:
        """The request `load` held the model for ends without starting on it."""
        self.residency.unhold(self._resolved(spec))

    def load_in_background(self, spec: ModelSpec):
        """A concurrent Future of the load, for threads without an event loop."""
        return self.residency.load(self._resolved(spec))

    async def unload(self, name: str) -> bool:
        return await asyncio.wrap_future(self.residency.unload(name))

    def unload_in_background(self, name: str):
        return self.residency.unload(name)

    def submit(self, spec: ModelSpec, requests: list[GenerationRequest]) -> GenerationGroup:
        """Start sequences together on `spec`'s resident model. Raises QueueFull (starting none)
        when the admission queue is full, NotResident when the model was unloaded meanwhile."""
        model = self.residency.checkout(self._resolved(spec))
        if model is None:
            raise NotResident(spec.name)
        try:
            group = GenerationGroup(self, model, requests)
        except BaseException:
            self.residency.release(model)
            raise
        announcement = _announcement.get()
        if announcement is not None:  # the request is in the queue now: no longer on its way
            announcement.end()
        return group

    async def embed(self, spec: ModelSpec, inputs: list[list[int]]) -> list[list[float]]:
        """Vectors for `inputs` from `spec`'s resident embedding model (NotResident when it was
        unloaded meanwhile); requests arriving together share the model's batches."""
        model = self.residency.checkout(self._resolved(spec))
        if model is None:
            raise NotResident(spec.name)
        try:
            if not isinstance(model, EmbeddingModel):
                raise TypeError(f"{spec.name!r} is not an embedding model")
            return await model.embed(inputs)
        finally:
            self.residency.release(model)

    def loaded(self) -> list[ResidentInfo]:
        return self.residency.loaded()

    def announce(self, count: int) -> None:
        for backend in list(self._backends.values()):
            backend.announce(count)

    def stats(self) -> EngineStats:
        loaded = self.residency.loaded()
        backends = dict(self._backends)
        default = backends.get(self.default_backend)
        return EngineStats(
            backend=self.default_backend,
            device=default.device if default is not None else "",
            backends={name: b.device for name, b in backends.items()},
            loaded_models=loaded,
            running=sum(m.running for m in loaded),
            queued=sum(m.waiting for m in loaded),
            tokens_generated=sum(b.tokens_generated for b in backends.values()),
            started_at=self.started_at,
        )

    def shutdown(self) -> None:
        """Free the models and stop the backends' threads (at exit: mlx aborts the process if
        its threads are still busy while the interpreter tears down)."""
        for backend in list(self._backends.values()):
            backend.interrupt()
        self.residency.close()
        for backend in list(self._backends.values()):
            backend.shutdown()


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
        self._engine: Engine | None = engine
        engine.announce(1)

    def end(self) -> None:
        if self._engine is not None:
            self._engine.announce(-1)
            self._engine = None


_announcement: contextvars.ContextVar[_Announcement | None] = contextvars.ContextVar(
    "llm_service_announcement", default=None
)


@contextlib.contextmanager
def announced() -> Iterator[None]:
    """Around the whole handling of one generation request, from its arrival: tells the backends
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
