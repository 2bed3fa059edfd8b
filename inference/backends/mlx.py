"""mlx-lm backend: continuous batching on `mlx_lm.generate.BatchGenerator`.

Each model's batch is created, stepped and freed on the backend's one step-loop thread
(inference/backends/step_loop.py): mlx-lm's batch generator is not thread-safe.
"""

from __future__ import annotations

import json
import logging
import random
from collections import deque
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

from inference import constraints
from inference.backends import mlx_batching, mlx_cpu
from inference.backends.base import Backend, LoadedModel
from inference.backends.step_loop import StepBatch, StepLoop, SteppedModel
from inference.types import GenerationRequest, ModelSpec, SamplingParams, TokenDelta

log = logging.getLogger(__name__)

# OpenAI's penalties look at the whole text so far; mlx-lm defaults to the last 20 tokens.
PENALTY_CONTEXT = 1024
# Prompts prefilled together when a burst arrives: each group's first tokens go out as soon as it is
# prefilled, so smaller groups answer a burst sooner at a small cost in prefill speed.
DEFAULT_PREFILL_GROUP = 4


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature == 0 or params.top_k == 1


def uses_top_p(params: SamplingParams) -> bool:
    return 0 < params.top_p < 1.0


def needs_normalized_logprobs(params: SamplingParams, raw_kept: bool = False) -> bool:
    """Whether sampling or the response reads log probabilities rather than just raw logits. The
    response does not where the model's own logits are kept for it (RawLogits)."""
    if params.logprobs and not raw_kept:
        return True
    return not is_greedy(params) and (uses_top_p(params) or params.min_p > 0)


def make_sampler(params: SamplingParams):
    """A sampler with its own PRNG stream, so `seed` reproduces whatever else is in the batch."""
    if is_greedy(params):
        # One shared object: the batch samples every greedy row in one call.
        return greedy_sampler
    seed = params.seed if params.seed is not None else random.getrandbits(62)
    temp = params.temperature
    methods = []
    if uses_top_p(params):
        methods.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0:
        methods.append(lambda x: apply_min_p(x, params.min_p))
    if params.top_k > 0:
        methods.append(lambda x: apply_top_k(x, params.top_k))
    step = 0

    def sampler(logprobs: mx.array) -> mx.array:
        nonlocal step
        for method in methods:
            logprobs = method(logprobs)
        key = mx.random.key((seed * 1_000_003 + step) % (1 << 63))
        step += 1
        return mx.random.categorical(logprobs * (1 / temp), key=key)

    return sampler


def make_processors(params: SamplingParams) -> list:
    return make_logits_processors(
        logit_bias=dict(params.logit_bias) or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        repetition_context_size=PENALTY_CONTEXT,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=PENALTY_CONTEXT,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=PENALTY_CONTEXT,
    )


def read_context_length(path: str) -> int:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return 2048
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config") or {}
    return int(text.get("max_position_embeddings", 2048))


class MLXBatch(StepBatch):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model, wrapper = mlx_load(spec.path)
        self._wrapper = wrapper
        self.tokenizer = wrapper._tokenizer
        self.eos_token_ids = frozenset(wrapper.eos_token_ids)
        # The model's own limit; a per-model setting may lower it per request (see serving).
        self.context_length = read_context_length(spec.path)
        mlx_cpu.install(self.model, positions=self.context_length)
        self.memory_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        self._max_batch = spec.max_batch_size
        self._uid_to_seq: dict[int, int] = {}
        self._seq_to_uid: dict[int, int] = {}
        self._top_logprobs: dict[int, int] = {}  # uid -> top n (0 = just the sampled token)
        self._raw: dict[int, RawLogits] = {}  # uid -> its logits as the model gave them
        # KV caches of finished sequences, by their tokens: a new prompt that shares a prefix (the
        # chat template's system prompt, earlier turns of a conversation) skips that prefill.
        self._prompt_cache = LRUPromptCache(max_size=spec.prompt_cache_entries)
        # Built at load, so a constrained request never waits for it on the step loop.
        self._grammar_tokenizer = constraints.tokenizer_for(self.tokenizer, self.eos_token_ids)
        self._new_generator()

    def _prefill_group_size(self, max_batch: int) -> int:
        if self.spec.prefill_batch_size:
            return min(self.spec.prefill_batch_size, max_batch)
        # mlx-lm's own scheduling returns first tokens only after the whole prefill: one big group.
        return min(DEFAULT_PREFILL_GROUP if self._eager else max_batch, max_batch)

    def _new_generator(self) -> None:
        self._eager = mlx_batching.supports(self.model)
        generator = mlx_batching.EagerBatchGenerator if self._eager else BatchGenerator
        self._gen = generator(
            self.model,
            stop_tokens=[[t] for t in sorted(self.eos_token_ids)],
            completion_batch_size=self._max_batch,
            prefill_batch_size=self._prefill_group_size(self._max_batch),
            # The calling (step loop) thread's stream, as mlx_lm.server does: mlx streams are
            # per-thread, and the module-level generation stream belongs to the importer.
            stream=mx.default_stream(mx.default_device()),
        )

    def set_max_batch_size(self, size: int) -> None:
        self._max_batch = size
        self._gen.completion_batch_size = size
        self._gen.prefill_batch_size = self._prefill_group_size(size)

    def _cached_prefix(self, prompt: list[int]) -> tuple[list | None, list[int]]:
        if self.spec.prompt_cache_entries <= 0:
            return None, prompt
        cache, rest = self._prompt_cache.fetch_nearest_cache(self.spec.name, prompt)
        if cache is not None and not rest:
            # An exact hit: recompute the last token so the batch has something to start from.
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def prepare(self, request: GenerationRequest) -> constraints.GrammarProcessor | None:
        if request.constraint is None:
            return None
        return constraints.GrammarProcessor(self._grammar_tokenizer, request.constraint)

    def add(
        self,
        seq_id: int,
        request: GenerationRequest,
        prepared: constraints.GrammarProcessor | None = None,
    ) -> int:
        params = request.params
        prompt = list(request.prompt_tokens)
        processors = make_processors(params)
        grammar = prepared if prepared is not None else self.prepare(request)
        if grammar is not None:
            processors.append(grammar)
        raw = RawLogits() if params.logprobs and processors else None
        if raw is not None:
            processors.insert(0, raw)
        cache, rest = self._cached_prefix(prompt)
        (uid,) = self._gen.insert(
            [rest],
            max_tokens=[params.max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[prompt[: len(prompt) - len(rest)]] if cache is not None else None,
            samplers=[make_sampler(params)],
            logits_processors=[processors],
        )
        self._uid_to_seq[uid] = seq_id
        self._seq_to_uid[seq_id] = uid
        if params.logprobs:
            self._top_logprobs[uid] = params.top_logprobs
        if raw is not None:
            self._raw[uid] = raw
        if self._eager and needs_normalized_logprobs(params, raw_kept=raw is not None):
            self._gen.normalized_uids.add(uid)
        return len(prompt) - len(rest)

    def remove(self, seq_ids: list[int]) -> None:
        uids = [self._seq_to_uid.pop(s) for s in seq_ids if s in self._seq_to_uid]
        if uids:
            self._gen.remove(uids)
            for uid in uids:
                self._uid_to_seq.pop(uid, None)
                self._top_logprobs.pop(uid, None)
                self._raw.pop(uid, None)

    def step(self) -> list[tuple[int, TokenDelta]]:
        _, responses = self._gen.next()
        out: list[tuple[int, TokenDelta]] = []
        for r in responses:
            seq_id = self._uid_to_seq.get(r.uid)
            if seq_id is None:  # removed while its token was in flight
                continue
            recomputed = self._gen.retaken.pop(r.uid, 0) if self._eager else 0
            kept = self._raw.get(r.uid)
            raw = kept.rows.popleft() if kept is not None else None
            if r.finish_reason == "stop":
                # The stop token itself is not part of the answer.
                delta = TokenDelta(None, finish_reason="stop", recomputed=recomputed)
            else:
                logprob, top = None, ()
                top_n = self._top_logprobs.get(r.uid)
                if top_n is not None:
                    logprobs = r.logprobs if raw is None else raw - mx.logsumexp(raw)
                    logprob, top = _logprobs(logprobs, r.token, top_n)
                delta = TokenDelta(r.token, logprob, top, r.finish_reason, recomputed=recomputed)
            out.append((seq_id, delta))
            if r.finish_reason is not None:
                if r.prompt_cache is not None and self.spec.prompt_cache_entries > 0:
                    self._prompt_cache.insert_cache(
                        self.spec.name, list(r.all_tokens), r.prompt_cache
                    )
                del self._uid_to_seq[r.uid]
                self._seq_to_uid.pop(seq_id, None)
                self._top_logprobs.pop(r.uid, None)
                self._raw.pop(r.uid, None)
        return out

    def cache_bytes(self) -> dict[str, int]:
        # Read from another thread while the step loop works: sizes only, nothing evaluated.
        kv = 0
        for batch in (
            getattr(self._gen, "_prompt_batch", None),
            getattr(self._gen, "_generation_batch", None),
        ):
            for layer in getattr(batch, "prompt_cache", None) or ():
                try:
                    kv += layer.nbytes
                except (AttributeError, TypeError):  # a layer cache not filled yet
                    pass
        return {"kv": kv, "prompt": self._prompt_cache.nbytes}

    def reset(self) -> None:
        self._prompt_cache = LRUPromptCache(max_size=self.spec.prompt_cache_entries)
        self._uid_to_seq.clear()
        self._seq_to_uid.clear()
        self._top_logprobs.clear()
        self._raw.clear()
        self._gen.close()
        self._new_generator()

    def close(self) -> None:
        self._gen.close()
        del self.model
        mx.clear_cache()


class RawLogits:
    """The first logits processor of a request that asks for logprobs and has others (penalties,
    logit bias, a grammar), which mlx-lm's log probabilities come after: it keeps each step's
    logits as the model gave them, one row per token in order, for the logprobs to be the
    model's own, as vLLM's (raw_logprobs) and llama-server's are."""

    def __init__(self) -> None:
        self.rows: deque[mx.array] = deque()

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self.rows.append(logits[0])
        return logits


def _logprobs(logprobs: mx.array, token: int, top_n: int) -> tuple[float, tuple]:
    chosen = logprobs[token].item()
    if top_n <= 0:
        return chosen, ()
    idx = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
    values = logprobs[idx]
    order = mx.argsort(-values)
    idx, values = idx[order].tolist(), values[order].tolist()
    return chosen, tuple(zip(idx, values, strict=True))


class MLXBackend(Backend):
    name = "mlx"

    def __init__(self, *, max_queue: int = 64) -> None:
        self.loop = StepLoop(max_queue=max_queue, name="mlx-step-loop")
        self.loop.start()

    @property
    def device(self) -> str:
        device = mx.default_device()
        if device.type == mx.gpu:
            return "metal"
        return "cpu"

    @property
    def tokens_generated(self) -> int:
        return self.loop.tokens_generated

    def load(self, spec: ModelSpec) -> LoadedModel:
        log.info("loading %s from %s", spec.name, spec.path)
        if spec.kind == "embedding":  # its own thread batches requests (no step loop)
            from inference.backends.mlx_embeddings import MLXEmbeddingModel

            return MLXEmbeddingModel(spec)
        # Created on the loop's thread: mlx streams are per thread, and that thread steps it.
        return self.loop.call(
            lambda: SteppedModel(
                self.loop,
                MLXBatch(spec),
                backend_name=self.name,
            )
        ).result()

    def announce(self, count: int) -> None:
        self.loop.announce(count)

    def shutdown(self) -> None:
        self.loop.stop()
