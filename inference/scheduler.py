"""The scheduler: one thread that owns every loaded model and drives their batches.

Other threads talk to it only through a command queue; it answers through futures (loads) and by
scheduling token deliveries onto each request's asyncio loop. A request joins its model's running
batch at the next step and leaves it as soon as it finishes or is cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from inference.backends.base import Backend, LoadedModel
from inference.types import GenerationRequest, ModelSpec, TokenDelta

log = logging.getLogger(__name__)

IDLE_WAIT = 0.5  # seconds the idle loop sleeps between keep-alive checks
COALESCE_WINDOW = 0.015  # an idle model waits this long for more of a burst before prefilling,
COALESCE_MAX = 0.15  # and at most this long in all (also for announced requests, see announce)
ANNOUNCED_POLL = 0.002  # how often it looks whether the announced requests are all queued


class QueueFull(Exception):
    """More requests are waiting than the admission queue allows."""


class ModelBusy(Exception):
    """A model cannot be loaded (pinned models or the memory budget leave no room)."""


class _NoRoomYet(Exception):
    """Every resident model is busy: the load waits for one to go idle."""


@dataclass
class Sink:
    """Where one sequence's deltas go: `(key, delta)` pairs on an asyncio queue living on `loop`."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    key: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    cached_tokens: int = 0


@dataclass
class Slot:
    spec: ModelSpec
    model: LoadedModel
    waiting: deque = field(default_factory=deque)  # (seq_id, request)
    running: set[int] = field(default_factory=set)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        *,
        max_queue: int = 64,
        max_loaded_models: int = 1,
        memory_budget_bytes: int = 0,
        load_wait: float = 300.0,
    ) -> None:
        self.backend = backend
        self.max_queue = max_queue
        self.max_loaded_models = max_loaded_models
        self.memory_budget_bytes = memory_budget_bytes
        # How long a load waits for busy models to go idle before answering "busy".
        self.load_wait = load_wait
        self._deferred: list[tuple[float, tuple]] = []  # (deadline, command) waiting for room
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # By (name, path, backend), least recently used first. A model re-registered with new files
        # gets a new slot; the old one finishes its requests and is then the first to go.
        self._slots: OrderedDict[tuple, Slot] = OrderedDict()
        self._sinks: dict[int, Sink] = {}
        self._seq_ids = itertools.count(1)
        self._queued = 0
        self._announced = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-scheduler", daemon=True)
        self.tokens_generated = 0
        self.started_at = time.time()
        self._pending: dict[asyncio.AbstractEventLoop, list] = {}

    # --- API for other threads -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def resident(self, spec: ModelSpec) -> LoadedModel | None:
        """The loaded model for `spec` if it is resident now, read without waiting for the thread.

        A request for a loaded model skips a round trip through the command queue, which would wait
        for the current batch step to end. Settings changes still reach the slot at submit time.
        """
        slot = self._slots.get((spec.name, *spec.load_key))
        return slot.model if slot is not None else None

    def close_models(self) -> None:
        """Free every model; only once the thread has stopped (see stop)."""
        if self._thread.is_alive():
            return
        for key in list(self._slots):
            try:
                self._unload(key)
            except Exception:
                log.exception("closing %s failed", key[0])

    def load(self, spec: ModelSpec) -> Future:
        """Load (or refresh the settings of) a model; the future resolves to its LoadedModel."""
        future: Future = Future()
        self._commands.put(("load", spec, future))
        return future

    def unload(self, name: str) -> Future:
        future: Future = Future()
        self._commands.put(("unload", name, future))
        return future

    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        """Queue a request for its model's batch; raises QueueFull past the admission limit."""
        with self._lock:
            if self._queued >= self.max_queue:
                raise QueueFull()
            self._queued += 1
        seq_id = next(self._seq_ids)
        self._commands.put(("submit", seq_id, request, sink))
        return seq_id

    def cancel(self, seq_id: int) -> None:
        self._commands.put(("cancel", seq_id))

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
        return sum(len(s.running) for s in list(self._slots.values()))

    def loaded(self) -> list[dict]:
        return [
            {
                "name": slot.spec.name,
                "path": slot.spec.path,
                "memory_bytes": slot.model.memory_bytes,
                "context_length": slot.model.context_length,
                "running": len(slot.running),
                "waiting": len(slot.waiting),
                "pinned": slot.spec.pinned,
                "idle_seconds": round(time.monotonic() - slot.last_used, 1),
            }
            for slot in list(self._slots.values())
        ]

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        last_expiry = 0.0
        while not self._stop.is_set():
            busy = any(not s.idle for s in self._slots.values())
            self._drain_commands(block=not busy)
            if self._stop.is_set():
                break
            if self._deferred:
                self._retry_deferred()
            if self._starting_fresh():
                self._gather_burst()
            for slot in list(self._slots.values()):
                self._admit(slot)
                if slot.running:
                    self._step(slot)
            now = time.monotonic()
            if now - last_expiry > IDLE_WAIT:
                last_expiry = now
                self._expire_idle()
        for slot in list(self._slots.values()):
            for seq_id in list(slot.running) + [s for s, _ in slot.waiting]:
                self._finish(
                    seq_id, TokenDelta(None, finish_reason="error", error="server shutting down")
                )

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
        return any(slot.waiting and not slot.running for slot in self._slots.values())

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
            except _NoRoomYet:
                self._deferred.append((time.monotonic() + self.load_wait, command))
            except Exception:  # a bad command must never take the thread down
                log.exception("scheduler command %s failed", command[0])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "submit":
            _, seq_id, request, sink = command
            self._sinks[seq_id] = sink
            try:
                slot = self._ensure_loaded(request.model)
            except _NoRoomYet:
                raise
            except Exception as exc:
                with self._lock:
                    self._queued -= 1
                self._finish(
                    seq_id,
                    TokenDelta(None, finish_reason="error", error=f"model load failed: {exc}"),
                )
                return
            slot.waiting.append((seq_id, request))
        elif kind == "cancel":
            self._cancel(command[1])
        elif kind == "load":
            _, spec, future = command
            if future.done():
                return
            try:
                model = self._ensure_loaded(spec).model
            except _NoRoomYet:
                raise
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(model)
        elif kind == "unload":
            _, name, future = command
            keys = [k for k in self._slots if k[0] == name]
            if any(not self._slots[k].idle for k in keys):
                future.set_exception(ModelBusy(f"model {name} has requests in flight"))
                return
            for key in keys:
                self._unload(key)
            future.set_result(bool(keys))

    def _retry_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        now = time.monotonic()
        for deadline, command in deferred:
            try:
                self._handle(command)
            except _NoRoomYet as exc:
                if now < deadline:
                    self._deferred.append((deadline, command))
                else:
                    self._fail_command(command, ModelBusy(str(exc)))
            except Exception:
                log.exception("deferred command %s failed", command[0])

    def _fail_command(self, command: tuple, exc: Exception) -> None:
        if command[0] == "load" and not command[2].done():
            command[2].set_exception(exc)
        elif command[0] == "submit":
            with self._lock:
                self._queued -= 1
            self._finish(command[1], TokenDelta(None, finish_reason="error", error=str(exc)))

    def _ensure_loaded(self, spec: ModelSpec) -> Slot:
        key = (spec.name, *spec.load_key)
        slot = self._slots.get(key)
        if slot is not None:
            if slot.spec != spec:
                if spec.max_batch_size != slot.spec.max_batch_size:
                    slot.model.set_max_batch_size(spec.max_batch_size)
                slot.spec = spec
            slot.last_used = time.monotonic()
            self._slots.move_to_end(key)
            return slot
        self._make_room(spec)
        started = time.monotonic()
        model = self.backend.load(spec)
        log.info("loaded %s in %.1f s", spec.name, time.monotonic() - started)
        slot = Slot(spec=spec, model=model)
        self._slots[key] = slot
        return slot

    def _resident_bytes(self) -> int:
        return sum(s.model.memory_bytes for s in self._slots.values())

    def _over_limits(self, incoming_bytes: int) -> bool:
        if len(self._slots) >= self.max_loaded_models:
            return True
        budget = self.memory_budget_bytes
        return bool(budget) and self._resident_bytes() + incoming_bytes > budget

    def _make_room(self, spec: ModelSpec) -> None:
        budget = self.memory_budget_bytes
        if budget and spec.size_bytes > budget:
            raise ModelBusy(
                f"{spec.name} needs about {spec.size_bytes / 1e9:.1f} GB, more than the memory "
                f"budget of {budget / 1e9:.1f} GB"
            )
        while self._over_limits(spec.size_bytes):
            victim = next(
                (key for key, s in self._slots.items() if s.idle and not s.spec.pinned), None
            )
            if victim is None:
                if all(s.spec.pinned for s in self._slots.values()):
                    raise ModelBusy(
                        f"{len(self._slots)} pinned models fill the limits; unpin one or raise "
                        "LLM_SERVICE_MAX_LOADED_MODELS / LLM_SERVICE_MEMORY_BUDGET_GB"
                    )
                # Busy models free up when their requests end: wait for that, not fail.
                raise _NoRoomYet(
                    f"every resident model is busy; {spec.name} waited {self.load_wait:.0f} s"
                )
            log.info("unloading %s to make room for %s (least recently used)", victim[0], spec.name)
            self._unload(victim)

    def _unload(self, key: tuple) -> None:
        slot = self._slots.pop(key)
        slot.model.close()

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for key, slot in list(self._slots.items()):
            keep_alive = slot.spec.keep_alive
            if slot.idle and not slot.spec.pinned and keep_alive is not None:
                if now - slot.last_used > keep_alive:
                    log.info("unloading %s after %.0f s idle", slot.spec.name, keep_alive)
                    self._unload(key)

    def _admit(self, slot: Slot) -> None:
        if not slot.waiting:
            return
        now = time.monotonic()
        while slot.waiting and len(slot.running) < slot.spec.max_batch_size:
            seq_id, request = slot.waiting.popleft()
            with self._lock:
                self._queued -= 1
            sink = self._sinks.get(seq_id)
            if sink is None:  # cancelled while waiting
                continue
            try:
                sink.cached_tokens = slot.model.add(seq_id, request) or 0
            except Exception as exc:
                log.exception("could not add request %s", request.request_id)
                self._finish(seq_id, TokenDelta(None, finish_reason="error", error=str(exc)))
                continue
            sink.admitted_at = now
            slot.running.add(seq_id)
        slot.last_used = now

    def _step(self, slot: Slot) -> None:
        try:
            events = slot.model.step()
        except Exception as exc:
            # Never let one bad batch kill the engine: end its sequences, keep the weights.
            log.exception("generation step failed for %s", slot.spec.name)
            for seq_id in list(slot.running):
                self._finish(
                    seq_id,
                    TokenDelta(None, finish_reason="error", error=str(exc)),
                    deliver_now=False,
                )
            slot.running.clear()
            slot.model.reset()
            self._flush()
            return
        slot.last_used = time.monotonic()
        for seq_id, delta in events:
            if delta.token is not None:
                self.tokens_generated += 1
            if delta.recomputed and (sink := self._sinks.get(seq_id)) is not None:
                sink.cached_tokens = max(0, sink.cached_tokens - delta.recomputed)
            if delta.finish_reason is not None:
                slot.running.discard(seq_id)
                self._finish(seq_id, delta, deliver_now=False)
            else:
                self._queue_delivery(seq_id, delta)
        self._flush()

    # Deliveries are batched per event loop: one thread-safe callback per step, not per token.
    def _queue_delivery(self, seq_id: int, delta: TokenDelta) -> None:
        sink = self._sinks.get(seq_id)
        if sink is not None:
            self._pending.setdefault(sink.loop, []).append((sink.queue, (sink.key, delta)))

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
        for entry in self._deferred:
            if entry[1][0] == "submit" and entry[1][1] == seq_id:
                self._deferred.remove(entry)
                with self._lock:
                    self._queued -= 1
                return
        for slot in self._slots.values():
            if seq_id in slot.running:
                slot.model.remove([seq_id])
                slot.running.discard(seq_id)
                return
            # Still waiting: _admit skips it (its sink is gone) and fixes the queue count.


def _deliver(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)
