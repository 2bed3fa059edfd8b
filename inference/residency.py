"""Which models are resident, for every backend: loads, LRU unloads, keep-alive, pinned, budget.

One worker thread does loads and unloads in turn (a load can take a minute on vLLM; requests for
models already resident never wait for it). A request checks its model out for as long as it runs
(`checkout`/`release`), so only models with nothing in flight are ever unloaded to make room, and a
load that needs room waits for a busy model to finish instead of failing. No Django here.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from inference.backends.base import Backend, LoadedModel, ModelBusy
from inference.types import ModelSpec

log = logging.getLogger(__name__)

EXPIRY_INTERVAL = 0.5  # seconds between keep-alive checks
# A model loaded for a request is held for it until it starts (checkout), or until the request
# ends without starting (serving.base.holds_released); should neither happen, this long at most.
HOLD_SECONDS = 30.0


@dataclass(frozen=True)
class Load:
    spec: ModelSpec
    future: Future
    hold: bool = False


@dataclass(frozen=True)
class Unload:
    name: str
    future: Future


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(eq=False)
class Resident:
    spec: ModelSpec
    model: LoadedModel
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    # Deadlines of the holds of requests it was loaded or found for that have not started yet.
    holds: list[float] = field(default_factory=list)

    @property
    def idle(self) -> bool:
        now = time.monotonic()
        return self.in_flight == 0 and not any(deadline > now for deadline in self.holds)

    def hold(self) -> None:  # under the manager's lock, as unhold
        now = time.monotonic()
        self.holds = [deadline for deadline in self.holds if deadline > now]
        self.holds.append(now + HOLD_SECONDS)

    def unhold(self) -> None:
        if self.holds:
            self.holds.pop(0)


@dataclass(frozen=True)
class ResidentInfo:
    name: str
    path: str
    backend: str
    memory_bytes: int
    context_length: int
    running: int
    waiting: int
    in_flight: int
    pinned: bool
    idle_seconds: float
    engine_requests: int = 0
    cache_bytes: dict[str, int] = field(default_factory=dict)


def _key(spec: ModelSpec) -> tuple:
    return (spec.name, *spec.load_key)


class ResidencyManager:
    def __init__(
        self,
        backend_for: Callable[[ModelSpec], Backend],
        *,
        max_loaded_models: int = 1,
        memory_budget_bytes: int = 0,
        load_wait: float = 300.0,
    ) -> None:
        self._backend_for = backend_for
        self.max_loaded_models = max_loaded_models
        self.memory_budget_bytes = memory_budget_bytes
        # How long a load waits for busy models to go idle before answering "busy".
        self.load_wait = load_wait
        # By (name, path, backend), least recently used first. A model re-registered with new files
        # gets a new entry; the old one finishes its requests and is then the first to go.
        self._models: OrderedDict[tuple, Resident] = OrderedDict()
        self._cond = threading.Condition()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting_for_room: str | None = None  # the model whose load waits for busy ones
        self._heap_changed: str | None = None  # "loaded" or "closed", for _settle_heap
        self._thread = threading.Thread(target=self._run, name="llm-residency", daemon=True)
        self._thread.start()

    # --- any thread ------------------------------------------------------------------------

    def resident(self, spec: ModelSpec, *, hold: bool = False) -> LoadedModel | None:
        """The loaded model for `spec` if resident now (its settings refreshed), without waiting;
        `hold`: kept from unloading until a request starts on it (`checkout`)."""
        with self._cond:
            entry = self._models.get(_key(spec))
            if entry is None or not entry.model.alive:
                return None
            self._refresh(entry, spec)
            if hold:
                entry.hold()
            return entry.model

    def checkout(self, spec: ModelSpec) -> LoadedModel | None:
        """The resident model for `spec`, held against unloading until `release`; None when it is
        not resident (unloaded since it was loaded: load it again)."""
        with self._cond:
            entry = self._models.get(_key(spec))
            if entry is None or not entry.model.alive:
                return None
            self._refresh(entry, spec)
            entry.in_flight += 1
            entry.unhold()  # the request's own hold, if it had one, is now its checkout
            return entry.model

    def unhold(self, spec: ModelSpec) -> None:
        with self._cond:
            entry = self._models.get(_key(spec))
            if entry is not None:
                entry.unhold()
            self._cond.notify_all()

    def release(self, model: LoadedModel) -> None:
        with self._cond:
            for entry in self._models.values():
                if entry.model is model:
                    entry.in_flight = max(0, entry.in_flight - 1)
                    entry.last_used = time.monotonic()
                    break
            self._cond.notify_all()

    def load(self, spec: ModelSpec, *, hold: bool = False) -> Future:
        """Make `spec` resident; the future resolves to its LoadedModel (or ModelBusy, or the
        backend's load error). `hold`, for a request about to start on it: without it, the load
        of another model for another request could unload this one before it starts, and two
        such requests would unload each other's model in turn."""
        future: Future = Future()
        model = self.resident(spec, hold=hold)
        if model is not None:
            future.set_result(model)
        else:
            self._commands.put(Load(spec, future, hold))
        return future

    def unload(self, name: str) -> Future:
        """Unload every model called `name`; ModelBusy while it has requests in flight."""
        future: Future = Future()
        self._commands.put(Unload(name, future))
        return future

    def loaded(self) -> list[ResidentInfo]:
        now = time.monotonic()
        with self._cond:
            entries = list(self._models.values())
        return [
            ResidentInfo(
                name=e.spec.name,
                path=e.spec.path,
                backend=e.model.backend_name,
                memory_bytes=e.model.memory_bytes,
                context_length=e.model.context_length,
                running=e.model.running,
                waiting=e.model.queued,
                in_flight=e.in_flight,
                pinned=e.spec.pinned,
                idle_seconds=round(now - e.last_used, 1) if e.idle else 0.0,
                engine_requests=e.model.engine_requests,
                cache_bytes=e.model.cache_bytes(),
            )
            for e in entries
        ]

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker and free every model."""
        self._commands.put(Stop())
        self._thread.join(timeout)
        with self._cond:
            entries = list(self._models.values())
            self._models.clear()
        for entry in entries:
            self._close(entry)

    # --- the worker thread -------------------------------------------------------------------

    def _refresh(self, entry: Resident, spec: ModelSpec) -> None:
        entry.last_used = time.monotonic()
        self._models.move_to_end(_key(entry.spec))
        if entry.spec != spec:
            entry.spec = spec
            entry.model.update_spec(spec)

    def _run(self) -> None:
        while True:
            try:
                command = self._commands.get(timeout=EXPIRY_INTERVAL)
            except queue.Empty:
                command = None
            if isinstance(command, Stop):
                return
            try:
                if isinstance(command, Load):
                    self._load(command)
                elif isinstance(command, Unload):
                    self._unload(command)
                self._drop_dead()
                self._expire_idle()
            except Exception:  # the worker must outlive any one command
                log.exception("residency command %s failed", type(command).__name__)
            self._settle_heap()

    def _load(self, command: Load) -> None:
        spec, future = command.spec, command.future
        if not future.set_running_or_notify_cancel():
            return
        try:
            model = self.resident(spec, hold=command.hold)
            if model is None:
                self._drop_dead()
                self._drop_superseded(spec)
                try:
                    self._make_room(spec)
                finally:
                    self.waiting_for_room = None
                started = time.monotonic()
                model = self._backend_for(spec).load(spec)
                log.info("loaded %s in %.1f s", spec.name, time.monotonic() - started)
                entry = Resident(spec=spec, model=model)
                if command.hold:
                    entry.hold()
                with self._cond:
                    self._models[_key(spec)] = entry
                self._heap_changed = self._heap_changed or "loaded"
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(model)

    def _unload(self, command: Unload) -> None:
        with self._cond:
            keys = [k for k in self._models if k[0] == command.name]
            if any(not self._models[k].idle for k in keys):
                command.future.set_exception(
                    ModelBusy(f"model {command.name} has requests in flight")
                )
                return
            entries = [self._models.pop(k) for k in keys]
        for entry in entries:
            self._close(entry)
        command.future.set_result(bool(entries))

    def _drop_dead(self) -> None:
        """Models that can serve nothing more (a runner process that died), requests in flight or
        not: those requests have failed already, and a new one loads the model again."""
        with self._cond:
            dead = [k for k, e in self._models.items() if not e.model.alive]
            entries = [self._models.pop(k) for k in dead]
        for entry in entries:
            log.warning(
                "%s stopped serving (its engine process exited): unloading it", entry.spec.name
            )
            self._close(entry)

    def _drop_superseded(self, spec: ModelSpec) -> None:
        """The same model with other files or engine settings: the old one goes first (once its
        requests have ended), so a settings change never holds two engines' memory for long."""
        with self._cond:
            stale = [
                k
                for k, e in self._models.items()
                if k[0] == spec.name and k != _key(spec) and e.idle
            ]
            entries = [self._models.pop(k) for k in stale]
        for entry in entries:
            log.info("unloading %s: its files or engine settings changed", entry.spec.name)
            self._close(entry)

    def _over_limits(self, incoming_bytes: int) -> bool:
        if len(self._models) >= self.max_loaded_models:
            return True
        budget = self.memory_budget_bytes
        resident = sum(e.model.memory_bytes for e in self._models.values())
        return bool(budget) and resident + incoming_bytes > budget

    def _make_room(self, spec: ModelSpec) -> None:
        budget = self.memory_budget_bytes
        if budget and spec.size_bytes > budget:
            raise ModelBusy(
                f"{spec.name} needs about {spec.size_bytes / 1e9:.1f} GB, more than the memory "
                f"budget of {budget / 1e9:.1f} GB"
            )
        deadline = time.monotonic() + self.load_wait
        while True:
            with self._cond:
                if not self._over_limits(spec.size_bytes):
                    return
                victim = next(
                    (k for k, e in self._models.items() if e.idle and not e.spec.pinned), None
                )
                if victim is None:
                    if all(e.spec.pinned for e in self._models.values()):
                        raise ModelBusy(
                            f"{len(self._models)} pinned models fill the limits; unpin one or "
                            "raise LLM_SERVICE_MAX_LOADED_MODELS / LLM_SERVICE_MEMORY_BUDGET_GB"
                        )
                    # Busy models free up when their requests end: wait for that, not fail.
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ModelBusy(
                            f"every resident model is busy; {spec.name} waited "
                            f"{self.load_wait:.0f} s"
                        )
                    self.waiting_for_room = spec.name
                    self._cond.wait(min(remaining, EXPIRY_INTERVAL))
                    continue
                entry = self._models.pop(victim)
            log.info("unloading %s to make room for %s (least recently used)", victim[0], spec.name)
            self._close(entry)

    def _expire_idle(self) -> None:
        now = time.monotonic()
        expired = []
        with self._cond:
            for key, entry in list(self._models.items()):
                keep_alive = entry.spec.keep_alive
                if entry.idle and not entry.spec.pinned and keep_alive is not None:
                    if now - entry.last_used > keep_alive:
                        expired.append(self._models.pop(key))
        for entry in expired:
            log.info("unloading %s after %.0f s idle", entry.spec.name, entry.spec.keep_alive)
            self._close(entry)

    def _close(self, entry: Resident) -> None:
        self._heap_changed = "closed"
        try:
            entry.model.close()
        except Exception:
            log.exception("closing %s failed", entry.spec.name)

    def _settle_heap(self) -> None:
        """After a load, hide everything alive from the cyclic garbage collector (`gc.freeze`, as
        vLLM's server does after its startup). A full collection walks every tracked object with
        the GIL held, so every stream stops meanwhile; a loaded model brings the backends'
        modules, its tokenizer and their caches, and most of the walk would be over objects that
        live as long as the process. After an unload, show them again for one full collection
        first: a closed model's objects that are garbage only in cycles are freed now, not never.
        """
        changed, self._heap_changed = self._heap_changed, None
        if changed is None:
            return
        if changed == "closed":
            gc.unfreeze()
        gc.collect()
        gc.freeze()
