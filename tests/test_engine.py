"""The scheduler's bookkeeping, and failures that cannot be caused on demand with a real model.

`FlakyModel` stands in for a backend whose generation step fails (out of memory, a kernel error):
the real mlx backend cannot be made to fail at a chosen step here.
"""

from __future__ import annotations

import asyncio
import gc
import json
import weakref

import pytest
from transformers import AutoTokenizer

from inference import engine as engine_module
from inference.backends.base import Backend, QueueFull
from inference.backends.step_loop import StepBatch, StepLoop, SteppedModel
from inference.engine import Engine, EngineConfig, announced
from inference.serving import base as serving
from inference.types import GenerationRequest, ModelSpec, SamplingParams, TokenDelta
from llmservice.errors import APIError
from tests.helpers import wait_until


class FlakyModel(StepBatch):
    def __init__(self, spec: ModelSpec, tokenizer, fail_at: int) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.context_length, self.memory_bytes = 512, 0
        self.eos_token_ids = frozenset()
        self.running: dict[int, int] = {}
        self.steps, self.fail_at, self.resets = 0, fail_at, 0

    def add(self, seq_id, request, prepared=None):
        self.running[seq_id] = request.params.max_tokens

    def remove(self, seq_ids):
        for s in seq_ids:
            self.running.pop(s, None)

    def step(self):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("kernel exploded")
        out = []
        for seq_id in list(self.running):
            self.running[seq_id] -= 1
            done = self.running[seq_id] == 0
            out.append((seq_id, TokenDelta(28, finish_reason="length" if done else None)))
            if done:
                del self.running[seq_id]
        return out

    def reset(self):
        self.resets += 1
        self.running.clear()


class FlakyBackend(Backend):
    """A stepped backend whose batch fails at a chosen step (the mlx one cannot be made to)."""

    name = "flaky"

    def __init__(self, tokenizer, fail_at: int, max_queue: int = 64, start: bool = True) -> None:
        self.tokenizer, self.fail_at, self.batches = tokenizer, fail_at, []
        self.loop = StepLoop(max_queue=max_queue)
        if start:
            self.loop.start()

    @property
    def device(self):
        return "none"

    def load(self, spec):
        def make():
            self.batches.append(FlakyModel(spec, self.tokenizer, self.fail_at))
            return SteppedModel(self.loop, self.batches[-1], backend_name=self.name)

        return self.loop.call(make).result()

    def announce(self, count):
        self.loop.announce(count)

    def shutdown(self):
        self.loop.stop()


def make_engine(backend: FlakyBackend, **config) -> Engine:
    return Engine(EngineConfig(backend="flaky", **config), backends={"flaky": backend})


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(str(tiny_dir))


def make_job(model, max_tokens=5, n=1):
    return serving.Job(
        kind="chat",
        id="chatcmpl-test",
        created=0,
        spec=model.spec,
        model=model,
        prompts=[[1, 2, 3]],
        params=SamplingParams(max_tokens=max_tokens),
        n=n,
        stops=[],
        include_usage=False,
    )


async def collect(job, engine):
    group = engine.submit(job.spec, job.requests())
    events = []
    async for event in serving.stream_events(job, group, lambda c, t, f: {"text": t}, None):
        events.append(event)
    return events


def test_a_failing_step_ends_its_streams_with_an_error_event_then_done(tokenizer):
    backend = FlakyBackend(tokenizer, fail_at=3, max_queue=8)
    engine = make_engine(backend)
    try:
        spec = ModelSpec(name="flaky", path="/nowhere")
        model = engine.load_in_background(spec).result(5)
        events = asyncio.run(collect(make_job(model, max_tokens=10), engine))
        assert events[-1] == b"data: [DONE]\n\n"
        error = json.loads(events[-2][len("data: ") :])["error"]
        assert error["type"] == "server_error" and "kernel exploded" in error["message"]
        assert backend.batches[0].resets == 1
        # The engine lives on: the next request on the same model completes.
        events = asyncio.run(collect(make_job(model, max_tokens=3), engine))
        assert events[-1] == b"data: [DONE]\n\n"
        assert all(b"error" not in e for e in events)
        stats = engine.stats()
        assert stats.running == 0 and stats.queued == 0
        assert [m.in_flight for m in stats.loaded_models] == [0]
    finally:
        engine.shutdown()


def test_the_admission_queue_is_bounded_and_submits_nothing_when_full(tokenizer):
    # The loop is not started: nothing is admitted, so the queue fills.
    backend = FlakyBackend(tokenizer, fail_at=-1, max_queue=2, start=False)
    engine = make_engine(backend)
    spec = ModelSpec(name="m", path="/nowhere")
    engine.load_in_background(spec).result(5)
    request = GenerationRequest("r", spec, (1, 2), SamplingParams())

    async def main():
        engine.submit(spec, [request, request])
        with pytest.raises(QueueFull):
            engine.submit(spec, [request])
        return backend.loop.queued

    try:
        assert asyncio.run(main()) == 2
        # The refused request holds nothing: only the first group is in flight.
        assert [m.in_flight for m in engine.loaded()] == [1]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("announced_first", [True, False], ids=["announced", "unannounced"])
def test_an_idle_model_waits_for_announced_requests_so_a_burst_prefills_together(
    tokenizer, announced_first
):
    backend = FlakyBackend(tokenizer, fail_at=-1)
    engine = make_engine(backend)
    try:
        spec = ModelSpec(name="m", path="/nowhere")
        engine.load_in_background(spec).result(5)
        batch = backend.batches[0]
        batch_sizes = []
        step = batch.step
        batch.step = lambda: (batch_sizes.append(len(batch.running)), step())[1]
        request = GenerationRequest("r", spec, (1, 2), SamplingParams(max_tokens=2))

        async def main():
            if announced_first:
                engine.announce(1)  # the second request is still being parsed
            first = engine.submit(spec, [request])
            await asyncio.sleep(0.08)  # longer than a coalescing window, within its maximum
            second = engine.submit(spec, [GenerationRequest("r2", spec, (1, 2), request.params)])
            if announced_first:
                engine.announce(-1)
            for group in (first, second):
                async for _ in group:
                    pass

        asyncio.run(main())
        assert batch_sizes[0] == (2 if announced_first else 1)
    finally:
        engine.shutdown()


def test_an_announcement_lasts_until_the_request_is_submitted_or_fails(tokenizer, monkeypatch):
    backend = FlakyBackend(tokenizer, fail_at=-1, max_queue=1, start=False)
    engine = make_engine(backend)
    monkeypatch.setattr(engine_module, "_engine", engine)
    spec = ModelSpec(name="m", path="/nowhere")
    engine.load_in_background(spec).result(5)
    request = GenerationRequest("r", spec, (1,), SamplingParams())

    async def main():
        with announced():
            assert backend.loop._announced == 1
            engine.submit(spec, [request])
            assert backend.loop._announced == 0
        with pytest.raises(QueueFull), announced():  # the queue (1) is full: nothing submitted
            engine.submit(spec, [request])
        with pytest.raises(ValueError), announced():
            raise ValueError("bad request")

    try:
        asyncio.run(main())
        assert backend.loop._announced == 0
    finally:
        engine.shutdown()


def test_least_recently_used_idle_models_are_unloaded_at_the_limit(tokenizer):
    engine = make_engine(FlakyBackend(tokenizer, fail_at=-1), max_loaded_models=2)
    try:
        for name in ("a", "b", "a", "c"):
            engine.load_in_background(ModelSpec(name=name, path=f"/{name}")).result(5)
        assert sorted(m.name for m in engine.loaded()) == ["a", "c"]
        pinned = ModelSpec(name="p", path="/p", pinned=True)
        engine.load_in_background(pinned).result(5)
        engine.load_in_background(ModelSpec(name="d", path="/d")).result(5)
        assert "p" in {m.name for m in engine.loaded()}
    finally:
        engine.shutdown()


def test_a_loaded_model_is_kept_from_the_collector_until_unloaded_then_freed_cycles_and_all(
    tokenizer,
):
    backend = FlakyBackend(tokenizer, fail_at=-1)
    engine = make_engine(backend)
    try:
        engine.load_in_background(ModelSpec(name="a", path="/a")).result(5)
        batch = backend.batches.pop()
        batch.itself = batch  # garbage only in a cycle once unloaded
        # A full collection would walk it (with every stream stopped) and free nothing.
        loaded = id(batch)
        wait_until(lambda: all(id(o) != loaded for o in gc.get_objects()))
        gone = weakref.ref(batch)
        del batch
        assert engine.unload_in_background("a").result(5)
        wait_until(lambda: gone() is None)
    finally:
        engine.shutdown()


def test_a_load_waits_for_a_busy_model_to_finish_instead_of_failing(tokenizer):
    engine = make_engine(FlakyBackend(tokenizer, fail_at=-1), max_loaded_models=1)
    try:
        a = ModelSpec(name="a", path="/a")
        engine.load_in_background(a).result(5)

        async def main():
            group = engine.submit(
                a, [GenerationRequest("r", a, (1, 2), SamplingParams(max_tokens=200))]
            )
            loading_b = asyncio.wrap_future(
                engine.load_in_background(ModelSpec(name="b", path="/b"))
            )
            tokens = 0
            async for _, delta in group:
                tokens += delta.token is not None
                if tokens == 1:
                    assert not loading_b.done()  # b waits while a is busy
            await loading_b
            return tokens

        assert asyncio.run(main()) == 200  # a's request was not dropped for b
        assert [m.name for m in engine.loaded()] == ["b"]
    finally:
        engine.shutdown()


def test_a_submit_to_a_model_unloaded_meanwhile_asks_for_a_new_load(tokenizer):
    engine = make_engine(FlakyBackend(tokenizer, fail_at=-1), max_loaded_models=1)
    try:
        a, b = ModelSpec(name="a", path="/a"), ModelSpec(name="b", path="/b")
        engine.load_in_background(a).result(5)
        engine.load_in_background(b).result(5)  # a was idle: unloaded for b
        with pytest.raises(engine_module.NotResident):
            engine.submit(a, [GenerationRequest("r", a, (1,), SamplingParams())])
    finally:
        engine.shutdown()


def test_a_model_loaded_for_a_request_is_not_unloaded_for_another_before_it_starts(tokenizer):
    # Two requests for two models with room for one: each load used to unload the model just
    # loaded for the other request before it started, in turn, until both got 503 model_busy.
    engine = make_engine(FlakyBackend(tokenizer, fail_at=-1), max_loaded_models=1)
    try:
        a, b = ModelSpec(name="a", path="/a"), ModelSpec(name="b", path="/b")

        async def main():
            model_a = await engine.load(a)  # for a request that has not started yet
            loading_b = asyncio.wrap_future(engine.residency.load(b, hold=True))
            while not loading_b.done() and engine.residency.waiting_for_room != "b":
                await asyncio.sleep(0.01)
            group = engine.submit(
                a, [GenerationRequest("r", a, (1, 2), SamplingParams(max_tokens=20))]
            )
            assert group.model is model_a and not loading_b.done()
            tokens = [delta.token async for _, delta in group]
            await loading_b
            return tokens

        assert len(asyncio.run(main())) == 20
        assert [m.name for m in engine.loaded()] == ["b"]
    finally:
        engine.shutdown()


def test_a_request_refused_after_its_model_loaded_lets_go_of_it(tokenizer, monkeypatch):
    # Its prompt too long, its client gone, or count_tokens: nothing ever starts on the model.
    engine = make_engine(FlakyBackend(tokenizer, fail_at=-1), max_loaded_models=1)
    monkeypatch.setattr(serving, "engine", lambda: engine)
    monkeypatch.setattr(serving, "current_engine", lambda: engine)
    try:
        a, b = ModelSpec(name="a", path="/a"), ModelSpec(name="b", path="/b")

        async def refused_after_the_load():
            with serving.holds_released():
                await serving.load_model(a)
                raise APIError(400, "This model's maximum context length is ...")

        with pytest.raises(APIError):
            asyncio.run(refused_after_the_load())
        # Without the release, b's load would wait for a's hold to time out.
        engine.load_in_background(b).result(5)
        assert [m.name for m in engine.loaded()] == ["b"]
    finally:
        engine.shutdown()


def test_a_model_bigger_than_the_memory_budget_is_refused_clearly(tokenizer):
    engine = make_engine(FlakyBackend(tokenizer, fail_at=-1), memory_budget_bytes=1_000_000)
    try:
        with pytest.raises(Exception, match="memory budget"):
            engine.load_in_background(
                ModelSpec(name="big", path="/big", size_bytes=5_000_000)
            ).result(5)
        engine.load_in_background(ModelSpec(name="small", path="/small", size_bytes=1000)).result(5)
    finally:
        engine.shutdown()
