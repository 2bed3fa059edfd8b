"""The step loop of engines that we batch ourselves (mlx-lm): one thread owns their batches.

mlx-lm's BatchGenerator is not thread-safe, so one thread creates every mlx model, steps each busy
batch once per loop and hands new tokens to each request's asyncio queue (one
`loop.call_soon_threadsafe` per event loop per step, not per token). Other threads talk to it only
through typed commands. A request joins its model's running batch at the next step and leaves it as
soon as it finishes or is aborted. Which models are resident is the residency manager's business
(inference/residency.py), not this loop's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from inference.backends.base import Capabilities, LoadedModel, QueueFull
from inference.types import GenerationRequest, ModelSpec, TokenDelta

log = logging.getLogger(__name__)

IDLE_WAIT = 0.5  # seconds the idle loop blocks on its command queue
COALESCE_WINDOW = 0.015  # an idle model waits this long for more of a burst before prefilling,
COALESCE_MAX = 0.15  # and at most this long in all (also for announced requests, see announce)
ANNOUNCED_POLL = 0.002  # how often it looks whether the announced requests are all queued


class StepBatch(ABC):
    """One model's running batch, driven only from the loop's thread.

    `add` and `remove` take effect at the next `step`; `step` advances every running sequence by
    at most one token and returns what each produced. A finish delta (finish_reason set) is the
    sequence's last; after it the sequence is gone from the batch.
    """

    spec: ModelSpec
    tokenizer: Any
    context_length: int
    memory_bytes: int
    eos_token_ids: frozenset[int]

    def prepare(self, request: GenerationRequest) -> Any:
        """Per-request work done on the caller's thread before the request is queued (building
        its grammar matcher), so the step loop never waits on it; handed to `add`."""
        return None

    @abstractmethod
    def add(self, seq_id: int, request: GenerationRequest, prepared: Any = None) -> int | None:
        """Join the batch at the next step; returns how many prompt tokens came from a cache."""

    @abstractmethod
    def remove(self, seq_ids: list[int]) -> None: ...

    @abstractmethod
    def step(self) -> list[tuple[int, TokenDelta]]: ...

    @abstractmethod
    def reset(self) -> None:
        """Drop every sequence (after an error), keeping the weights."""

    def cache_bytes(self) -> dict[str, int]:
        return {}

    def set_max_batch_size(self, size: int) -> None:  # noqa: B027 - optional hook
        """Change how many sequences decode together, if the batch supports it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the batch holds."""


# --- commands to the loop's thread -----------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    seq_id: int
    slot: Slot
    request: GenerationRequest
    sink: Sink
    prepared: Any = None


@dataclass(frozen=True)
class Cancel:
    seq_id: int


@dataclass(frozen=True)
class Call:
    """Run `fn` on the loop's thread (model creation and teardown: mlx's thread affinity)."""

    fn: Callable[[], Any]
    future: Future


@dataclass(frozen=True)
class Wake:
    pass


@dataclass
class Sink:
    """Where one sequence's deltas go: an asyncio queue living on `loop`."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    cached_tokens: int = 0
    started: bool = False  # its first delta was sent (it carries cached_tokens)


@dataclass(eq=False)
class Slot:
    batch: StepBatch
    waiting: deque = field(default_factory=deque)  # (seq_id, request, prepared)
    running: set[int] = field(default_factory=set)
    closed: bool = False


class StepLoop:
    def __init__(self, *, max_queue: int = 64, name: str = "llm-step-loop") -> None:
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._slots: list[Slot] = []
        self._sinks: dict[int, Sink] = {}
        self._seq_ids = itertools.count(1)
        self._queued = 0
        self._announced = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.tokens_generated = 0
        self._pending: dict[asyncio.AbstractEventLoop, list] = {}

    # --- API for other threads -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(Wake())
        if self._thread.is_alive():
            self._thread.join(timeout)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the loop's thread between steps; the future resolves to its result."""
        future: Future = Future()
        if not self._thread.is_alive():  # stopped (shutdown): no thread affinity left to keep
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
            return future
        self._commands.put(Call(fn, future))
        return future

    def attach(self, batch: StepBatch) -> Slot:
        """A new batch to step (from the loop's thread, inside a `call`)."""
        slot = Slot(batch)
        self._slots.append(slot)
        return slot

    def detach(self, slot: Slot) -> None:
        """Stop stepping `slot` and end its sequences (from the loop's thread)."""
        slot.closed = True
        if slot in self._slots:
            self._slots.remove(slot)
        for seq_id in list(slot.running):
            self._finish(seq_id, TokenDelta(None, finish_reason="error", error="model unloaded"))
        while slot.waiting:
            seq_id, *_ = slot.waiting.popleft()
            with self._lock:
                self._queued -= 1
            self._finish(seq_id, TokenDelta(None, finish_reason="error", error="model unloaded"))
        slot.running.clear()

    def submit(
        self, slot: Slot, request: GenerationRequest, sink: Sink, prepared: Any = None
    ) -> int:
        """Queue a request for `slot`'s batch; raises QueueFull past the admission limit."""
        with self._lock:
            if self._queued >= self.max_queue:
                raise QueueFull()
            self._queued += 1
        seq_id = next(self._seq_ids)
        self._commands.put(Submit(seq_id, slot, request, sink, prepared))
        return seq_id

    def cancel(self, seq_id: int) -> None:
        self._commands.put(Cancel(seq_id))

    def announce(self, count: int) -> None:
        """`count` requests are on their way (+1 on arrival, -1 once submitted or failed): the HTTP
        layer parses and authenticates a burst one request at a time, and an idle model waits for
        the announced ones (up to COALESCE_MAX) so they prefill together."""
        with self._lock:
            self._announced = max(0, self._announced + count)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return sum(len(s.running) for s in list(self._slots))

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = any(s.running or s.waiting for s in self._slots)
            self._drain_commands(block=not busy)
            if self._stop.is_set():
                break
            if self._starting_fresh():
                self._gather_burst()
            self._step_slots()
        for slot in list(self._slots):
            for seq_id in list(slot.running) + [s for s, *_ in slot.waiting]:
                self._finish(
                    seq_id, TokenDelta(None, finish_reason="error", error="server shutting down")
                )

    def _step_slots(self) -> None:
        # Not inline in _run: its loop variable would keep the last slot, and so an unloaded
        # model, alive while the thread waits for work.
        for slot in list(self._slots):
            self._admit(slot)
            if slot.running:
                self._step(slot)

    def _gather_burst(self) -> None:
        """A burst of requests arrives a few ms apart (each is parsed and authenticated in turn):
        gather it so the prompts prefill together, instead of each waiting out a step. Announced
        requests (see announce) are waited for until the last is queued; otherwise the burst is
        over when a whole window brings nothing new."""
        deadline = time.monotonic() + COALESCE_MAX
        announced = False
        while time.monotonic() < deadline:
            if self._announced:
                announced = True
                time.sleep(ANNOUNCED_POLL)
                self._drain_commands(block=False)
                continue
            if announced:  # each announcement ends once its request is queued: all are here
                self._drain_commands(block=False)
                return
            waiting = self._queued
            time.sleep(COALESCE_WINDOW)
            self._drain_commands(block=False)
            if self._queued == waiting and not self._announced:
                return

    def _starting_fresh(self) -> bool:
        """Requests are waiting for a model whose batch is empty (nothing would be delayed)."""
        return any(slot.waiting and not slot.running for slot in self._slots)

    def _drain_commands(self, *, block: bool) -> None:
        try:
            command = (
                self._commands.get(timeout=IDLE_WAIT) if block else self._commands.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            try:
                self._handle(command)
            except Exception:  # a bad command must never take the thread down
                log.exception("step loop command %s failed", type(command).__name__)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: Submit | Cancel | Call | Wake) -> None:
        match command:
            case Submit(seq_id, slot, request, sink, prepared):
                self._sinks[seq_id] = sink
                if slot.closed:
                    with self._lock:
                        self._queued -= 1
                    self._finish(
                        seq_id, TokenDelta(None, finish_reason="error", error="model unloaded")
                    )
                    return
                slot.waiting.append((seq_id, request, prepared))
            case Cancel(seq_id):
                self._cancel(seq_id)
            case Call(fn, future):
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as exc:
                        future.set_exception(exc)
            case Wake():
                pass

    def _admit(self, slot: Slot) -> None:
        if not slot.waiting:
            return
        now = time.monotonic()
        limit = slot.batch.spec.max_batch_size
        while slot.waiting and len(slot.running) < limit:
            seq_id, request, prepared = slot.waiting.popleft()
            with self._lock:
                self._queued -= 1
            sink = self._sinks.get(seq_id)
            if sink is None:  # cancelled while waiting
                continue
            try:
                sink.cached_tokens = slot.batch.add(seq_id, request, prepared) or 0
            except Exception as exc:
                log.exception("could not add request %s", request.request_id)
                self._finish(seq_id, TokenDelta(None, finish_reason="error", error=str(exc)))
                continue
            sink.admitted_at = now
            slot.running.add(seq_id)

    def _step(self, slot: Slot) -> None:
        try:
            events = slot.batch.step()
        except Exception as exc:
            # Never let one bad batch kill the engine: end its sequences, keep the weights.
            log.exception("generation step failed for %s", slot.batch.spec.name)
            for seq_id in list(slot.running):
                self._finish(
                    seq_id,
                    TokenDelta(None, finish_reason="error", error=str(exc)),
                    deliver_now=False,
                )
            slot.running.clear()
            slot.batch.reset()
            self._flush()
            return
        for seq_id, delta in events:
            if delta.token is not None:
                self.tokens_generated += 1
            if delta.finish_reason is not None:
                slot.running.discard(seq_id)
                self._finish(seq_id, delta, deliver_now=False)
            else:
                self._queue_delivery(seq_id, delta)
        self._flush()

    # Deliveries are batched per event loop: one thread-safe callback per step, not per token.
    def _queue_delivery(self, seq_id: int, delta: TokenDelta) -> None:
        sink = self._sinks.get(seq_id)
        if sink is None:
            return
        if not sink.started:
            # The prompt tokens the batch took from its prefix cache, less those it recomputed.
            sink.started = True
            delta = replace(
                delta,
                cached_tokens=max(0, sink.cached_tokens - delta.recomputed),
                queue_wait=(sink.admitted_at or sink.submitted_at) - sink.submitted_at,
            )
        self._pending.setdefault(sink.loop, []).append((sink.queue, delta))

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass

    def _finish(self, seq_id: int, delta: TokenDelta, *, deliver_now: bool = True) -> None:
        self._queue_delivery(seq_id, delta)
        self._sinks.pop(seq_id, None)
        if deliver_now:
            self._flush()

    def _cancel(self, seq_id: int) -> None:
        if self._sinks.pop(seq_id, None) is None:
            return
        for slot in self._slots:
            if seq_id in slot.running:
                slot.batch.remove([seq_id])
                slot.running.discard(seq_id)
                return
            # Still waiting: _admit skips it (its sink is gone) and fixes the queue count.


def _deliver(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


# We detokenize and apply stop strings in serving; the batches reuse prompt caches and apply
# constraints as logits processors.
STEPPED = Capabilities(prefix_cache=True, constrained=True)


class SteppedModel(LoadedModel):
    """The request-level face of a batch stepped by a StepLoop."""

    capabilities = STEPPED

    def __init__(self, loop: StepLoop, batch: StepBatch, *, backend_name: str) -> None:
        self._loop = loop
        self._batch = batch
        self._slot = loop.attach(batch)
        self.backend_name = backend_name
        self.tokenizer = batch.tokenizer
        self.context_length = batch.context_length
        self.memory_bytes = batch.memory_bytes
        self.eos_token_ids = batch.eos_token_ids
        self._seqs: dict[str, int] = {}  # request id -> the loop's sequence id

    @property
    def spec(self) -> ModelSpec:
        return self._batch.spec

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        sink = Sink(loop=asyncio.get_running_loop(), queue=asyncio.Queue())
        prepared = self._batch.prepare(request)
        seq_id = self._loop.submit(self._slot, request, sink, prepared)
        self._seqs[request.request_id] = seq_id
        return self._deltas(request.request_id, sink)

    async def _deltas(self, request_id: str, sink: Sink) -> AsyncIterator[TokenDelta]:
        finished = False
        try:
            while not finished:
                delta = await sink.queue.get()
                finished = delta.finish_reason is not None
                if finished:
                    self._seqs.pop(request_id, None)
                yield delta
        finally:
            if not finished:  # the consumer left early (a disconnect): free the slot
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        seq_id = self._seqs.pop(request_id, None)
        if seq_id is not None:
            self._loop.cancel(seq_id)

    def update_spec(self, spec: ModelSpec) -> None:
        old = self._batch.spec
        if spec == old:
            return

        def apply() -> None:
            self._batch.spec = spec
            if spec.max_batch_size != old.max_batch_size:
                self._batch.set_max_batch_size(spec.max_batch_size)

        self._loop.call(apply)

    @property
    def running(self) -> int:
        return len(self._slot.running)

    @property
    def queued(self) -> int:
        return len(self._slot.waiting)

    def cache_bytes(self) -> dict[str, int]:
        return self._batch.cache_bytes()

    def close(self) -> None:
        def teardown() -> None:
            self._loop.detach(self._slot)
            self._batch.close()

        self._loop.call(teardown).result()
