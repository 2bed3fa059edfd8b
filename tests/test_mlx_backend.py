"""The mlx backend on a real (tiny, random-weight) model: eager prefill, decode without the
vocabulary normalisation, and the NumPy SwiGLU, each checked against mlx-lm's own code paths."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from inference.backends import mlx_batching, mlx_cpu
from inference.backends.mlx import MLXLoadedModel
from inference.types import GenerationRequest, ModelSpec, SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model = MLXLoadedModel(ModelSpec(name="tiny", path=str(tiny_dir), max_batch_size=16))
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


def test_the_numpy_parts_are_installed_on_the_cpu_and_match_mlx(loaded, tiny_dir):
    assert isinstance(loaded.model.model.layers[0].mlp, mlx_cpu.NumpySwiGLU)
    assert isinstance(loaded.model.model.embed_tokens, mlx_cpu.NumpyVocabulary)  # tied embeddings
    assert isinstance(loaded.model.model.layers[0].self_attn.rope, mlx_cpu.TableRoPE)
    plain, _ = mlx_load(str(tiny_dir))
    ours_cache, theirs_cache = make_prompt_cache(loaded.model), make_prompt_cache(plain)
    # Several rows (a prefill, a batch), then one row (a lone decoding sequence: NumPy's products).
    two_rows = mx.array([p[:8] for p in prompts(loaded, 3)[1:3]])
    for tokens in (two_rows, mx.array([[17]]), mx.array([[42]])):
        if tokens.shape[0] == 2:
            ours = loaded.model(tokens, cache=make_prompt_cache(loaded.model))
            theirs = plain(tokens, cache=make_prompt_cache(plain))
        else:
            ours = loaded.model(tokens, cache=ours_cache)
            theirs = plain(tokens, cache=theirs_cache)
        assert ours.shape == theirs.shape
        assert mx.allclose(ours, theirs, atol=1e-4, rtol=1e-4).item()


def test_a_burst_gets_its_first_tokens_group_by_group(loaded):
    greedy = SamplingParams(max_tokens=8, temperature=0)
    out, first = run(loaded, [(p, greedy) for p in prompts(loaded, 10)])
    # The first call prefills one group of four and answers it at once; nothing decodes yet.
    assert sorted(seq for seq, _ in first) == [0, 1, 2, 3]
    assert all(d.token is not None and d.finish_reason is None for _, d in first)
    assert all(sum(d.token is not None for d in deltas) == 8 for deltas in out.values())


def test_greedy_answers_in_a_burst_equal_mlx_lm_generating_each_alone(loaded, tiny_dir):
    token_lists = prompts(loaded, 6)
    out, _ = run(loaded, [(p, SamplingParams(max_tokens=12, temperature=0)) for p in token_lists])
    ours = [[d.token for d in out[i] if d.token is not None] for i in range(6)]
    assert ours == reference(tiny_dir, token_lists, 12)


def test_a_request_for_one_token_ends_at_its_first_token(loaded):
    out, first = run(loaded, [(prompts(loaded, 1)[0], SamplingParams(max_tokens=1, temperature=0))])
    assert [(d.token is not None, d.finish_reason) for d in out[0]] == [(True, "length")]


def test_an_end_of_sequence_first_token_ends_the_answer_empty(loaded):
    eos = min(loaded.eos_token_ids)
    params = SamplingParams(max_tokens=5, temperature=0, logit_bias=((eos, 100.0),))
    out, _ = run(loaded, [(prompts(loaded, 1)[0], params)])
    assert [(d.token, d.finish_reason) for d in out[0]] == [(None, "stop")]


def test_log_probabilities_are_normalised_even_beside_rows_that_skip_it(loaded):
    with_logprobs = SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    plain = SamplingParams(max_tokens=6, temperature=0)
    out, _ = run(
        loaded, [(p, with_logprobs if i == 0 else plain) for i, p in enumerate(prompts(loaded, 3))]
    )
    deltas = [d for d in out[0] if d.token is not None]
    assert len(deltas) == 6
    for d in deltas:
        assert d.logprob <= 0
        assert 0.0 < sum(math.exp(lp) for _, lp in d.top_logprobs) <= 1.0 + 1e-4


def test_a_request_removed_while_its_group_waits_frees_it_and_the_rest_finish(loaded):
    greedy = SamplingParams(max_tokens=4, temperature=0)
    out, first = run(
        loaded, [(p, greedy) for p in prompts(loaded, 8)], remove_after_first_step=(1, 2)
    )
    assert {seq for seq, _ in first} == {0, 1, 2, 3}
    assert [len(out[s]) for s in (1, 2)] == [1, 1]  # their first token, then nothing
    assert all(sum(d.token is not None for d in out[s]) == 4 for s in (0, 3, 4, 5, 6, 7))
    assert not loaded._gen._prompt_batch.uids and not loaded._gen._generation_batch.uids


def test_the_eager_generator_is_in_use_with_this_mlx_lm(loaded):
    # If an mlx-lm upgrade moves the internals it relies on, the backend falls back to mlx-lm's
    # plain BatchGenerator (as for architectures split_head does not know); this test says so
    # instead of letting the speed-up vanish silently.
    assert mlx_batching.supported()
    assert isinstance(loaded._gen, mlx_batching.EagerBatchGenerator)


def test_models_the_eager_generator_cannot_serve_get_mlx_lms_own_with_the_same_answers(
    loaded, tiny_dir, monkeypatch
):
    token_lists = prompts(loaded, 5)
    params = SamplingParams(max_tokens=10, temperature=0)
    eager, _ = run(loaded, [(p, params) for p in token_lists])
    monkeypatch.setattr(mlx_batching, "supports", lambda model: False)
    plain_model = MLXLoadedModel(ModelSpec(name="tiny", path=str(tiny_dir), max_batch_size=16))
    try:
        assert type(plain_model._gen) is BatchGenerator
        plain, _ = run(plain_model, [(p, params) for p in token_lists])
    finally:
        plain_model.close()
    assert [[d.token for d in eager[i]] for i in range(5)] == [
        [d.token for d in plain[i]] for i in range(5)
    ]
