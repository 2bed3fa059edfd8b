"""The scheduler's bookkeeping, and failures that cannot be caused on demand with a real model.

`FlakyModel` stands in for a backend whose generation step fails (out of memory, a kernel error):
the real mlx backend cannot be made to fail at a chosen step here.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from transformers import AutoTokenizer

from inference import engine as engine_module
from inference import serving
from inference.backends.base import Backend, LoadedModel
from inference.engine import Engine, GenerationGroup, announced
from inference.scheduler import QueueFull, Scheduler
from inference.types import GenerationRequest, ModelSpec, SamplingParams, TokenDelta


class FlakyModel(LoadedModel):
    def __init__(self, spec: ModelSpec, tokenizer, fail_at: int) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.context_length, self.memory_bytes = 512, 0
        self.eos_token_ids = frozenset()
        self.running: dict[int, int] = {}
        self.steps, self.fail_at, self.resets = 0, fail_at, 0

    def add(self, seq_id, request):
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
    name = "flaky"

    def __init__(self, tokenizer, fail_at: int) -> None:
        self.tokenizer, self.fail_at, self.models = tokenizer, fail_at, []

    @property
    def device(self):
        return "none"

    def load(self, spec):
        self.models.append(FlakyModel(spec, self.tokenizer, self.fail_at))
        return self.models[-1]


class FakeEngine:
    def __init__(self, scheduler):
        self.scheduler = scheduler


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
    group = GenerationGroup(engine, job.requests())
    events = []
    async for event in serving.stream_events(job, group, lambda c, t, f: {"text": t}, None):
        events.append(event)
    return events


def test_a_failing_step_ends_its_streams_with_an_error_event_then_done(tokenizer):
    backend = FlakyBackend(tokenizer, fail_at=3)
    scheduler = Scheduler(backend, max_queue=8)
    scheduler.start()
    try:
        spec = ModelSpec(name="flaky", path="/nowhere")
        model = scheduler.load(spec).result(5)
        engine = FakeEngine(scheduler)
        events = asyncio.run(collect(make_job(model, max_tokens=10), engine))
        assert events[-1] == "data: [DONE]\n\n"
        error = json.loads(events[-2][len("data: ") :])["error"]
        assert error["type"] == "server_error" and "kernel exploded" in error["message"]
        assert model.resets == 1
        # The engine lives on: the next request on the same model completes.
        events = asyncio.run(collect(make_job(model, max_tokens=3), engine))
        assert events[-1] == "data: [DONE]\n\n"
        assert all("error" not in e for e in events)
        assert scheduler.running == 0 and scheduler.queued == 0
    finally:
        scheduler.stop()


def test_the_admission_queue_is_bounded_and_submits_nothing_when_full(tokenizer):
    scheduler = Scheduler(FlakyBackend(tokenizer, fail_at=-1), max_queue=2)
    # Not started: nothing is admitted, so the queue fills.
    spec = ModelSpec(name="m", path="/nowhere")
    request = GenerationRequest("r", spec, (1, 2), SamplingParams())

    async def main():
        engine = FakeEngine(scheduler)
        GenerationGroup(engine, [request, request])
        with pytest.raises(QueueFull):
            GenerationGroup(engine, [request])
        return scheduler.queued

    assert asyncio.run(main()) == 2


@pytest.mark.parametrize("announced_first", [True, False], ids=["announced", "unannounced"])
def test_an_idle_model_waits_for_announced_requests_so_a_burst_prefills_together(
    tokenizer, announced_first
):
    scheduler = Scheduler(FlakyBackend(tokenizer, fail_at=-1))
    scheduler.start()
    try:
        model = scheduler.load(ModelSpec(name="m", path="/nowhere")).result(5)
        batch_sizes = []
        step = model.step
        model.step = lambda: (batch_sizes.append(len(model.running)), step())[1]
        request = GenerationRequest("r", model.spec, (1, 2), SamplingParams(max_tokens=2))

        async def main():
            engine = FakeEngine(scheduler)
            if announced_first:
                scheduler.announce(1)  # the second request is still being parsed
            first = GenerationGroup(engine, [request])
            await asyncio.sleep(0.08)  # longer than a coalescing window, within its maximum
            second = GenerationGroup(engine, [request])
            if announced_first:
                scheduler.announce(-1)
            for group in (first, second):
                async for _ in group:
                    pass

        asyncio.run(main())
        assert batch_sizes[0] == (2 if announced_first else 1)
    finally:
        scheduler.stop()


def test_an_announcement_lasts_until_the_request_is_submitted_or_fails(tokenizer, monkeypatch):
    scheduler = Scheduler(FlakyBackend(tokenizer, fail_at=-1), max_queue=1)
    engine = Engine.__new__(Engine)  # no backend, no thread: only the bookkeeping is under test
    engine.scheduler = scheduler
    monkeypatch.setattr(engine_module, "_engine", engine)
    request = GenerationRequest("r", ModelSpec(name="m", path="/nowhere"), (1,), SamplingParams())

    async def main():
        with announced():
            assert scheduler._announced == 1
            engine.submit([request])
            assert scheduler._announced == 0
        with pytest.raises(QueueFull), announced():  # the queue (1) is full: nothing submitted
            engine.submit([request])
        with pytest.raises(ValueError), announced():
            raise ValueError("bad request")

    asyncio.run(main())
    assert scheduler._announced == 0


def test_least_recently_used_idle_models_are_unloaded_at_the_limit(tokenizer):
    backend = FlakyBackend(tokenizer, fail_at=-1)
    scheduler = Scheduler(backend, max_loaded_models=2)
    scheduler.start()
    try:
        for name in ("a", "b", "a", "c"):
            scheduler.load(ModelSpec(name=name, path=f"/{name}")).result(5)
        assert sorted(m["name"] for m in scheduler.loaded()) == ["a", "c"]
        pinned = ModelSpec(name="p", path="/p", pinned=True)
        scheduler.load(pinned).result(5)
        scheduler.load(ModelSpec(name="d", path="/d")).result(5)
        assert "p" in {m["name"] for m in scheduler.loaded()}
    finally:
        scheduler.stop()


def test_stop_strings_are_found_across_token_boundaries():
    stops = serving.StopFilter(["</end>", "STOP"])
    out = []
    for piece in ["Hello </", "en", "d> world"]:
        text, hit = stops.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello "
    assert hit


def test_text_that_only_looks_like_a_stop_start_is_released_later():
    stops = serving.StopFilter(["STOP"])
    assert stops.feed("ab ST") == ("ab ", False)
    assert stops.feed("ART") == ("START", False)
    assert stops.flush() == ""


def test_the_detokenizer_never_splits_a_multibyte_character(tokenizer):
    text = "naïve café 東京 🙂 done"
    detok = serving.Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_a_load_waits_for_a_busy_model_to_finish_instead_of_failing(tokenizer):
    backend = FlakyBackend(tokenizer, fail_at=-1)
    scheduler = Scheduler(backend, max_loaded_models=1)
    scheduler.start()
    try:
        a = ModelSpec(name="a", path="/a")
        scheduler.load(a).result(5)

        async def main():
            group = GenerationGroup(
                FakeEngine(scheduler),
                [GenerationRequest("r", a, (1, 2), SamplingParams(max_tokens=200))],
            )
            await asyncio.sleep(0)  # let the scheduler admit it
            loading_b = asyncio.wrap_future(scheduler.load(ModelSpec(name="b", path="/b")))
            tokens = 0
            async for _, delta in group:
                tokens += delta.token is not None
                if tokens == 1:
                    assert not loading_b.done()  # b waits while a is busy
            await loading_b
            return tokens

        assert asyncio.run(main()) == 200  # a's request was not dropped for b
        assert [m["name"] for m in scheduler.loaded()] == ["b"]
    finally:
        scheduler.stop()


def test_a_model_bigger_than_the_memory_budget_is_refused_clearly(tokenizer):
    scheduler = Scheduler(FlakyBackend(tokenizer, fail_at=-1), memory_budget_bytes=1_000_000)
    scheduler.start()
    try:
        with pytest.raises(Exception, match="memory budget"):
            scheduler.load(ModelSpec(name="big", path="/big", size_bytes=5_000_000)).result(5)
        scheduler.load(ModelSpec(name="small", path="/small", size_bytes=1000)).result(5)
    finally:
        scheduler.stop()
