"""The mlx backend on real (tiny, random-weight) models: eager prefill, decode without the vocabulary
normalisation, and the CPU parts (NumPy SwiGLU, products and prefill attention, transposed vocabulary,
RoPE table), each checked against mlx-lm's own code paths."""

from __future__ import annotations

import asyncio
import math
import weakref

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import llama
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from inference.backends import mlx_batching, mlx_cpu
from inference.backends.mlx import MLXBatch
from inference.engine import Engine, EngineConfig
from inference.types import GenerationRequest, ModelSpec, SamplingParams
from tests.helpers import wait_until


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model = MLXBatch(ModelSpec(name="tiny", path=str(tiny_dir), max_batch_size=16))
    yield model
    model.close()


def prompts(loaded, count):
    tok = loaded.tokenizer
    return [tok.encode(f"Request {i}: " + "word " * (3 + 5 * i)) for i in range(count)]


def run(loaded, requests, remove_after_first_step=()):
    """Step until every sequence ends; returns {seq_id: [deltas]} and the first step's output."""
    for seq_id, (tokens, params) in enumerate(requests):
        loaded.add(seq_id, GenerationRequest(str(seq_id), loaded.spec, tuple(tokens), params))
    out: dict[int, list] = {i: [] for i in range(len(requests))}
    first = loaded.step()
    loaded.remove(list(remove_after_first_step))
    pending = set(range(len(requests))) - set(remove_after_first_step)
    batch = first
    for _ in range(500):
        for seq_id, delta in batch:
            out[seq_id].append(delta)
            if delta.finish_reason:
                pending.discard(seq_id)
        if not pending:
            return out, first
        batch = loaded.step()
    raise AssertionError("generation did not finish")


def answer(deltas) -> list[int]:
    return [d.token for d in deltas if d.token is not None]


def reference(tiny_dir, token_lists, max_tokens):
    """mlx-lm's own BatchGenerator, one prompt at a time, with mlx's own SwiGLU."""
    model, wrapper = mlx_load(str(tiny_dir))
    answers = []
    for tokens in token_lists:
        gen = BatchGenerator(model, stop_tokens=[[t] for t in wrapper.eos_token_ids])
        (uid,) = gen.insert([tokens], max_tokens=[max_tokens])
        answer = []
        while True:
            _, responses = gen.next()
            for r in responses:
                if r.finish_reason != "stop":
                    answer.append(r.token)
                if r.finish_reason:
                    break
            else:
                continue
            break
        gen.close()
        answers.append(answer)
    return answers


@pytest.mark.parametrize(
    "tied", [True, False], ids=["tied-embeddings", "separate-output-projection"]
)
def test_the_cpu_parts_are_installed_and_give_mlx_lms_logits(loaded, tiny_dir, untied_dir, tied):
    path = tiny_dir if tied else untied_dir
    ours = loaded if tied else MLXBatch(ModelSpec(name="untied", path=str(path)))
    model = ours.model
    try:
        layers = model.model.layers
        assert isinstance(layers[0].mlp, mlx_cpu.NumpySwiGLU)
        assert isinstance(layers[0].self_attn.rope, mlx_cpu.TableRoPE)
        assert layers[0].self_attn.rope._cos is layers[1].self_attn.rope._cos  # one table per model
        if tied:
            assert isinstance(model.model.embed_tokens, mlx_cpu.NumpyVocabulary)
        else:
            assert isinstance(model.lm_head, mlx_cpu.NumpyHead)
        plain, _ = mlx_load(str(path))
        ours_cache, theirs_cache = make_prompt_cache(model), make_prompt_cache(plain)
        two_rows = mx.array([p[:8] for p in prompts(loaded, 3)[1:3]])
        # Several rows (a prefill, a batch), then one row (a lone decoding sequence: NumPy's products).
        for tokens in (two_rows, mx.array([[17]]), mx.array([[42]])):
            if tokens.shape[0] == 2:
                got = model(tokens, cache=make_prompt_cache(model))
                want = plain(tokens, cache=make_prompt_cache(plain))
            else:
                got = model(tokens, cache=ours_cache)
                want = plain(tokens, cache=theirs_cache)
            assert got.shape == want.shape
            assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
        # Prompts of different lengths share a left-padded batch cache: per-sequence RoPE offsets.
        token_lists = prompts(loaded, 3)
        greedy = SamplingParams(max_tokens=6, temperature=0)
        out, _ = run(ours, [(p, greedy) for p in token_lists])
        assert [answer(out[i]) for i in range(3)] == reference(path, token_lists, 6)
    finally:
        if not tied:
            ours.close()


@pytest.mark.parametrize(
    "heads, kv_heads, queries, keys", [(9, 3, 7, 12), (4, 4, 5, 5)], ids=["grouped", "plain"]
)
def test_prefill_attention_in_numpy_gives_mlxs_for_every_kind_of_mask(
    heads, kv_heads, queries, keys
):
    mx.random.seed(3)
    q = mx.random.normal((3, heads, queries, 16))
    k, v = mx.random.normal((3, kv_heads, keys, 16)), mx.random.normal((3, kv_heads, keys, 16))
    offset = keys - queries
    padding = mx.array([0, 2, 1])
    masks = {
        "none": None,
        "causal": "causal",
        "causal array": create_causal_mask(queries, offset),
        "left padding": create_causal_mask(queries, offset, left_padding=padding),
        "right padding": create_causal_mask(queries, offset, right_padding=padding),
        "additive": mx.where(create_causal_mask(queries, offset), 0.0, -1e9),
    }
    for name, mask in masks.items():
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
        got = mlx_cpu.numpy_attention(q, k, v, 0.25, mask)
        # A row with every key masked (left padding) stays finite, as mlx's does.
        assert mx.all(mx.isfinite(got)).item(), name
        assert mx.allclose(got, want, atol=1e-5).item(), name


def test_within_one_pass_every_layer_reuses_the_first_layers_rope_positions(loaded):
    layers = loaded.model.model.layers
    rope = layers[0].self_attn.rope
    x = mx.random.normal((3, 4, 5, rope.rope.dims))  # batch, heads, positions, dims
    offset = mx.array([4, 0, -2])  # a batch cache's offsets (left padding makes one negative)
    alone = rope(x, offset=offset)
    with mlx_cpu.shared_positions(offset, 5):
        shared = [layer.self_attn.rope(x, offset=offset) for layer in layers]
        assert len(mlx_cpu._pass.gathered) == 1  # one gather for every layer
    assert mlx_cpu._pass.positions is None
    for got in shared:
        np.testing.assert_allclose(np.asarray(got), np.asarray(alone), rtol=1e-6, atol=1e-6)
    want = rope.rope(x[:1], offset=4)  # mlx's own RoPE at the first sequence's positions
    np.testing.assert_allclose(np.asarray(alone[:1]), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_the_model_module_attends_through_numpy_for_a_prefill_only(loaded):
    assert llama.scaled_dot_product_attention is mlx_cpu.cpu_attention
    one_query = mx.random.normal((2, 4, 1, 16))
    keys = mx.random.normal((2, 4, 6, 16))
    # A decode step (one query position) stays in mlx: the same array mlx-lm's function returns.
    got = mlx_cpu.cpu_attention(one_query, keys, keys, None, scale=0.25, mask=None)
    want = mx.fast.scaled_dot_product_attention(one_query, keys, keys, scale=0.25, mask=None)
    assert mx.array_equal(got, want).item()


def test_swiglu_in_a_reused_buffer_equals_the_formula():
    gate = mx.random.normal((3, 5, 64)) * 40  # also far into exp's overflow
    up = mx.random.normal((3, 5, 64))
    buffer = mlx_cpu._scratch.take(gate.shape)
    got = mlx_cpu._silu_mul(np.asarray(gate), np.asarray(up), buffer)
    assert got is buffer
    want = np.asarray(gate * mx.sigmoid(gate) * up)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # A smaller shape reuses the same memory; a larger one grows it.
    assert np.shares_memory(mlx_cpu._scratch.take((2, 64)), buffer)
    assert mlx_cpu._scratch.take((40, 64)).size == 40 * 64


def test_a_burst_gets_its_first_tokens_group_by_group(loaded):
    greedy = SamplingParams(max_tokens=8, temperature=0)
    out, first = run(loaded, [(p, greedy) for p in prompts(loaded, 10)])
    # The first call prefills one group of four and answers it at once; nothing decodes yet.
    assert sorted(seq for seq, _ in first) == [0, 1, 2, 3]
    assert all(d.token is not None and d.finish_reason is None for _, d in first)
    assert all(len(answer(deltas)) == 8 for deltas in out.values())


@pytest.fixture
def padded(monkeypatch):
    """The keyword arguments of every `BatchKVCache.prepare` call: right padding goes through it."""
    calls = []
    prepare = BatchKVCache.prepare
    monkeypatch.setattr(
        BatchKVCache, "prepare", lambda self, **kw: calls.append(kw) or prepare(self, **kw)
    )
    return calls


def shared_prefix(loaded, count):
    """A long shared head (a system prompt), cached by a first request, and prompts that continue it
    with questions of different lengths."""
    tok = loaded.tokenizer
    head = tok.encode("You are a careful assistant. Answer briefly and well. " * 2)
    run(loaded, [(head + tok.encode(" Warm up."), SamplingParams(max_tokens=2, temperature=0))])
    return head, [head + tok.encode(f" Question {i}:" + " why" * (1 + 3 * i)) for i in range(count)]


def test_prompts_of_different_lengths_after_a_cached_prefix_prefill_without_padding(
    loaded, tiny_dir, padded
):
    _, token_lists = shared_prefix(loaded, 4)
    rests = [loaded._cached_prefix(p)[1] for p in token_lists]
    cached = [len(p) - len(rest) for p, rest in zip(token_lists, rests, strict=True)]
    assert min(cached) > 0 and len({len(rest) for rest in rests}) == 4
    # Shorter prompts take their missing tokens back from their cached prefix: no right padding,
    # so no roll of every layer's keys and values afterwards.
    greedy = SamplingParams(max_tokens=10, temperature=0)
    out, first = run(loaded, [(p, greedy) for p in token_lists])
    assert sorted(seq for seq, _ in first) == [0, 1, 2, 3]  # one group
    assert padded == []
    assert [answer(out[i]) for i in range(4)] == reference(tiny_dir, token_lists, 10)
    # Each prompt computed as many tokens as the longest uncached part: the usage's cached tokens
    # leave out those taken back (the first delta says how many).
    recomputed = dict((seq, d.recomputed) for seq, d in first)
    longest = max(map(len, rests))
    assert [cached[i] - recomputed[i] for i in range(4)] == [len(p) - longest for p in token_lists]
    assert not loaded._gen.retaken


def test_a_group_mixing_cached_and_uncached_prompts_left_pads_the_uncached_and_answers_right(
    loaded, tiny_dir, padded
):
    _, cached = shared_prefix(loaded, 2)
    tok = loaded.tokenizer
    fresh = [tok.encode("Nothing shared here"), tok.encode("Nor here, in a different way")]
    token_lists = [cached[1], fresh[0], cached[0], fresh[1]]
    assert [loaded._cached_prefix(p)[0] is not None for p in token_lists] == [1, 0, 1, 0]
    assert max(map(len, fresh)) < min(map(len, cached))  # the uncached ones need padding
    greedy = SamplingParams(max_tokens=10, temperature=0)
    one = SamplingParams(max_tokens=1, temperature=0)  # ends at its first token, left-padded
    out, _ = run(loaded, [(p, one if i == 3 else greedy) for i, p in enumerate(token_lists)])
    assert padded == []
    want = reference(tiny_dir, token_lists, 10)
    assert [answer(out[i]) for i in range(3)] == want[:3]
    assert answer(out[3]) == want[3][:1]
    # The finished row's cache came out of the left-padded batch whole: its prompt is cached.
    assert loaded._cached_prefix(fresh[1])[1] == fresh[1][-1:]
    # The exact growth is for the prefill's pass only: prefilled caches waiting to decode grow by
    # mlx-lm's 256 positions again.
    for seq, tokens in enumerate(fresh):
        loaded.add(10 + seq, GenerationRequest(str(seq), loaded.spec, tuple(tokens), greedy))
    loaded.step()  # prefills both; they wait in the prompt batch
    waiting = loaded._gen._prompt_batch.prompt_cache
    assert waiting and all(isinstance(c, BatchKVCache) for c in waiting)
    assert all("step" not in vars(c) and c.step == 256 for c in waiting)
    loaded.remove([10, 11])


def test_greedy_answers_in_a_burst_equal_mlx_lm_generating_each_alone(loaded, tiny_dir):
    token_lists = prompts(loaded, 6)
    out, _ = run(loaded, [(p, SamplingParams(max_tokens=12, temperature=0)) for p in token_lists])
    assert [answer(out[i]) for i in range(6)] == reference(tiny_dir, token_lists, 12)


def test_a_request_for_one_token_ends_at_its_first_token_and_leaves_its_prefix_cached(loaded):
    prompt = prompts(loaded, 1)[0]
    out, _ = run(loaded, [(prompt, SamplingParams(max_tokens=1, temperature=0))])
    assert [(d.token is not None, d.finish_reason) for d in out[0]] == [(True, "length")]
    # The same prompt again is served from the prefix cache, as after any finished request.
    assert loaded.add(99, GenerationRequest("99", loaded.spec, tuple(prompt), SamplingParams())) > 0
    loaded.remove([99])


def test_an_end_of_sequence_first_token_ends_the_answer_empty(loaded):
    eos = min(loaded.eos_token_ids)
    params = SamplingParams(max_tokens=5, temperature=0, logit_bias=((eos, 100.0),))
    out, _ = run(loaded, [(prompts(loaded, 1)[0], params)])
    assert [(d.token, d.finish_reason) for d in out[0]] == [(None, "stop")]


def test_log_probabilities_are_normalised_when_one_row_of_the_batch_asks_for_them(loaded):
    with_logprobs = SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    plain = SamplingParams(max_tokens=6, temperature=0)
    token_lists = prompts(loaded, 3)
    out, _ = run(
        loaded, [(p, with_logprobs if i == 0 else plain) for i, p in enumerate(token_lists)]
    )
    deltas = [d for d in out[0] if d.token is not None]
    assert len(deltas) == 6
    for d in deltas:
        assert d.logprob <= 0
        assert 0.0 < sum(math.exp(lp) for _, lp in d.top_logprobs) <= 1.0 + 1e-4
    assert not loaded._gen.normalized_uids  # finished rows no longer force normalisation


def test_a_request_removed_while_its_group_waits_frees_it_and_the_rest_finish(loaded, tiny_dir):
    greedy = SamplingParams(max_tokens=4, temperature=0)
    token_lists = prompts(loaded, 8)
    out, first = run(loaded, [(p, greedy) for p in token_lists], remove_after_first_step=(1, 2))
    assert {seq for seq, _ in first} == {0, 1, 2, 3}
    assert [len(out[s]) for s in (1, 2)] == [1, 1]  # their first token, then nothing
    kept = (0, 3, 4, 5, 6, 7)
    want = reference(tiny_dir, [token_lists[s] for s in kept], 4)
    assert [answer(out[s]) for s in kept] == want
    assert not loaded._gen._prompt_batch.uids and not loaded._gen._generation_batch.uids


def test_a_prompt_longer_than_a_prefill_chunk_lets_running_streams_decode_between_chunks(
    loaded, tiny_dir
):
    short, long = prompts(loaded, 1)[0], prompts(loaded, 12)[11]
    loaded._gen.prefill_step_size = 16
    try:
        assert len(short) <= 16 < 3 * 16 < len(long)
        tokens: dict[int, list] = {0: [], 1: []}

        def step():
            out = loaded.step()
            for seq, d in out:
                if d.token is not None:
                    tokens[seq].append(d.token)
            return out

        greedy = SamplingParams(max_tokens=24, temperature=0)
        loaded.add(0, GenerationRequest("0", loaded.spec, tuple(short), greedy))
        step(), step()
        loaded.add(1, GenerationRequest("1", loaded.spec, tuple(long), greedy))
        calls = 0
        while not tokens[1]:
            before = len(tokens[0])
            step()
            calls += 1
            assert len(tokens[0]) == before + 1  # the running stream never waits a whole call
        assert calls >= 3  # the long prompt took several chunks
        while len(tokens[0]) < 24 or len(tokens[1]) < 24:
            step()
        assert [tokens[0], tokens[1]] == reference(tiny_dir, [short, long], 24)
    finally:
        loaded._gen.prefill_step_size = 2048


def test_the_eager_generator_is_in_use_with_this_mlx_lm(loaded):
    # If an mlx-lm upgrade moves the internals it relies on, the backend falls back to mlx-lm's
    # plain BatchGenerator (as for architectures split_head does not know); this test says so
    # instead of letting the speed-up vanish silently.
    assert mlx_batching.supports(loaded.model)
    assert isinstance(loaded._gen, mlx_batching.EagerBatchGenerator)


def test_models_the_eager_generator_cannot_serve_get_mlx_lms_own_with_the_same_answers(
    loaded, tiny_dir, monkeypatch
):
    kinds = [
        SamplingParams(max_tokens=10, temperature=0),
        SamplingParams(max_tokens=10, temperature=0.9, top_k=40, seed=7),
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3),
        SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.5),
        SamplingParams(
            max_tokens=10, temperature=0, frequency_penalty=1.0, logit_bias=((28, 5.0),)
        ),
    ]
    requests = list(zip(prompts(loaded, 5), kinds, strict=True))
    eager, _ = run(loaded, requests)
    monkeypatch.setattr(mlx_batching, "supports", lambda model: False)
    plain_model = MLXBatch(ModelSpec(name="tiny", path=str(tiny_dir), max_batch_size=16))
    try:
        assert type(plain_model._gen) is BatchGenerator
        plain, _ = run(plain_model, requests)
    finally:
        plain_model.close()
    assert [answer(eager[i]) for i in range(5)] == [answer(plain[i]) for i in range(5)]


def test_a_request_for_log_probabilities_joining_a_batch_that_skips_them_gets_all_of_them(loaded):
    token_lists = prompts(loaded, 3)
    plain = SamplingParams(max_tokens=20, temperature=0)
    for seq in (0, 1):
        loaded.add(seq, GenerationRequest(str(seq), loaded.spec, tuple(token_lists[seq]), plain))
    for _ in range(4):
        loaded.step()
    asks = SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    loaded.add(2, GenerationRequest("2", loaded.spec, tuple(token_lists[2]), asks))
    got = []
    while not got or got[-1].finish_reason is None:
        got += [d for seq, d in loaded.step() if seq == 2]
    assert len(got) == 6
    for d in got:
        assert d.logprob <= 0
        assert 0.0 < sum(math.exp(lp) for _, lp in d.top_logprobs) <= 1.0 + 1e-4
    loaded.remove([0, 1])


def test_without_our_sgemm_numpys_blas_runs_one_thread_beside_mlxs(loaded):
    # This test process has no sgemm preloaded, so NumPy serves one-row products: two pools of BLAS
    # threads on the same cores made those steps several times slower.
    from threadpoolctl import threadpool_info

    numpy_blas = [i for i in threadpool_info() if "numpy.libs" in (i.get("filepath") or "")]
    assert numpy_blas and all(i["num_threads"] == 1 for i in numpy_blas)


def test_an_unloaded_model_is_freed_at_once_not_when_another_model_next_steps(tiny_dir):
    engine = Engine(EngineConfig(backend="mlx"))
    spec = ModelSpec(name="freed", path=str(tiny_dir), backend="mlx")
    try:
        model = engine.load_in_background(spec).result(120)

        async def answer():
            request = GenerationRequest("r", spec, (1, 2, 3), SamplingParams(max_tokens=3))
            return [delta async for _, delta in engine.submit(spec, [request])]

        assert asyncio.run(answer())
        freed = weakref.ref(model)
        del model
        assert engine.unload_in_background("freed").result(60)
        wait_until(lambda: freed() is None)
    finally:
        engine.shutdown()
