"""Two scheduling changes to mlx-lm's `BatchGenerator`, for time to first token and decode speed.

`EagerBatchGenerator` keeps mlx-lm's continuous batching (its caches, samplers, logits processors,
stop handling, `insert`/`remove`), and changes when work happens:

- Prefill is eager. mlx-lm's `next()` decodes the running batch, then prefills waiting prompts, and a
  prefilled prompt's first token comes out two calls later, after one more forward pass and one more
  prefill. Here a call with waiting prompts prefills one group (`prefill_batch_size` prompts) in a
  single pass over every prompt token, samples the first tokens from that pass's last positions and
  returns them at once. Groups wait, prefilled, until no prompt is waiting, then join the running
  batch together. A prompt longer than `prefill_step_size` (2048) takes mlx-lm's own path, which
  decodes the running batch between chunks. A burst of 16 requests gets its first tokens group by group instead of all after
  the whole burst's prefill (docs/benchmarks.md).
- A group's prompts are given one length where their cached prefixes allow it (`_align`), so the
  prefill needs no right padding and no roll of every layer's cache afterwards, and its caches grow
  by exactly the prompt length instead of mlx-lm's 256 positions. On the CPU, where mlx copies
  slowly, those copies were about a fifth of a group's prefill.
- Decode skips normalising logits over the vocabulary when no sequence in the batch needs log
  probabilities: greedy, temperature and top-k sampling pick the same token from raw logits. That
  log-sum-exp over 49k entries per row was about a tenth of a decode step on the CPU.

Both lean on `BatchGenerator`'s internals (`_unprocessed_sequences`, `_prompt_batch`,
`_currently_processing`, `GenerationBatch._step`) as of mlx-lm 0.32; `supports()` checks they are
there, and the backend falls back to the plain `BatchGenerator` when they are not, or when the model's
architecture is not one whose vocabulary projection it knows how to apply alone (`split_head`).
"""

from __future__ import annotations

import logging
import time
import types
from collections import deque
from contextlib import nullcontext
from itertools import islice

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import (
    BatchGenerator,
    GenerationBatch,
    PromptProcessingBatch,
    _right_pad_prompts,
)
from mlx_lm.models.cache import BatchKVCache, can_trim_prompt_cache, trim_prompt_cache

from inference.backends import mlx_cpu

log = logging.getLogger(__name__)

# Architectures whose `Model.__call__` is `head(self.model(inputs, cache))`: for them a prefill runs the
# vocabulary projection on each prompt's last position only, not on every prompt token.
PLAIN_HEAD_MODULES = frozenset({"llama", "qwen2", "qwen3"})
TESTED_MLX_LM = "0.32."


def _internals_known() -> bool:
    """mlx-lm's batch internals as this module knows them (0.32.x; pyproject pins it)."""
    if not mlx_lm.__version__.startswith(TESTED_MLX_LM):
        return False
    needed = (
        (BatchGenerator, ("_next", "_make_batch", "insert", "remove")),
        (PromptProcessingBatch, ("extend", "split", "generate", "filter")),
        (GenerationBatch, ("_step", "extend", "filter", "Response")),
    )
    return all(hasattr(cls, name) for cls, names in needed for name in names)


def split_head(model):
    """(body, head) so that model(x) == head(body(x)), or None when the architecture is not known."""
    if type(model).__module__.rsplit(".", 1)[-1] not in PLAIN_HEAD_MODULES:
        return None
    body = getattr(model, "model", None)
    args = getattr(model, "args", None)
    if body is None or args is None:
        return None
    if getattr(args, "tie_word_embeddings", False):
        return body, body.embed_tokens.as_linear
    head = getattr(model, "lm_head", None)
    return (body, head) if head is not None else None


def supports(model) -> bool:
    """Whether `EagerBatchGenerator` can serve this model with this mlx-lm."""
    return _internals_known() and split_head(model) is not None


class EagerBatchGenerator(BatchGenerator):
    def __init__(self, model, **kwargs) -> None:
        # The first token is checked against the stop sequences on its own; the decode batch then
        # starts fresh matchers, so a stop sequence must be one token (the backend's EOS ids).
        if any(len(s) != 1 for s in kwargs.get("stop_tokens") or ()):
            raise ValueError("EagerBatchGenerator supports single-token stop sequences only")
        super().__init__(model, **kwargs)
        # Prefill projects only the last positions: projecting whole chunks would hold a
        # chunk x vocabulary array of logits (gigabytes for a 150k vocabulary).
        self._body, self._head = split_head(model)
        # uids whose rows need normalised log probabilities (logprobs asked, top-p or min-p sampling)
        self.normalized_uids: set[int] = set()
        # uid -> prompt tokens `_align` took back from its cached prefix (computed after all)
        self.retaken: dict[int, int] = {}
        batch = self._generation_batch
        batch._step = types.MethodType(_decode_step, batch)
        batch.normalized_uids = self.normalized_uids
        # What a decode step hands back as a row's log probabilities when no row needs them. Made
        # and evaluated here: mlx streams belong to threads, and an unevaluated array made at import
        # (another thread) could not be evaluated by the thread that drives this generator.
        batch.no_logprobs = mx.zeros((0,))
        mx.eval(batch.no_logprobs)

    def remove(self, uids, return_prompt_caches=False):
        self.normalized_uids.difference_update(uids)
        for uid in uids:
            self.retaken.pop(uid, None)
        return super().remove(uids, return_prompt_caches)

    def _next(self):
        prompt_responses, responses = self._schedule()
        self.normalized_uids.difference_update(r.uid for r in responses if r.finish_reason)
        return prompt_responses, responses

    def _schedule(self):
        if self._unprocessed_sequences:
            room = (
                self.completion_batch_size - len(self._generation_batch) - len(self._prompt_batch)
            )
            if room > 0:
                n = min(self.prefill_batch_size, room, len(self._unprocessed_sequences))
                group = list(islice(self._unprocessed_sequences, n))
                if all(sum(map(len, seq[1])) <= self.prefill_step_size for seq in group):
                    return [], self._prefill_group(n)
                # A long prompt: mlx-lm's own prefill, one chunk per call with a decode step between
                # chunks, so running streams do not freeze for the whole prompt.
                return super()._next()
        # Decode, and let the prefilled groups join. mlx-lm's own prefill finds nothing to do:
        # prompts still waiting (batch full) stay hidden until there is room for them.
        waiting, self._unprocessed_sequences = self._unprocessed_sequences, deque()
        try:
            return super()._next()
        finally:
            self._unprocessed_sequences = waiting

    def _prefill_group(self, n: int) -> list:
        tic = time.perf_counter()
        self._align(n)
        batch = self._make_batch(n)  # also appends n entries to self._currently_processing
        entries = self._currently_processing[-n:]
        del self._currently_processing[-n:]
        prompts = [[t for segment in entry[0] for t in segment] for entry in entries]
        logits = self._head(self._prefill(batch, prompts))

        tokens, logprobs = [], []
        for i in range(n):
            row = logits[i : i + 1]
            processors = batch.logits_processors[i]
            if processors:
                context = mx.array(batch.tokens[i])
                for processor in processors:
                    row = processor(context, row)
            row = row - mx.logsumexp(row, axis=-1, keepdims=True)
            sampler = batch.samplers[i] or batch.fallback_sampler
            tokens.append(sampler(row))
            logprobs.append(row[0])
        mx.eval(tokens, logprobs)
        self._counters.prompt_tokens += sum(len(p) for p in prompts)
        self._counters.prompt_time += time.perf_counter() - tic

        responses, keep = [], []
        for i in range(n):
            token = tokens[i].item()
            finish = None
            if batch.stop_sequences[i].matcher().advance(token):
                finish = "stop"
            elif batch.max_tokens[i] <= 1:
                finish = "length"
            responses.append(
                GenerationBatch.Response(
                    uid=batch.uids[i],
                    token=token,
                    logprobs=logprobs[i],
                    finish_reason=finish,
                    # As mlx-lm does, a finished sequence hands back its cache for prefix reuse.
                    prompt_cache=batch.extract_cache(i) if finish else None,
                    all_tokens=list(batch.tokens[i]) if finish else None,
                )
            )
            if finish is None:
                keep.append(i)
                # The first token is the next input; one of the request's tokens is spent.
                entries[i][0] = [[token]]
                batch.max_tokens[i] -= 1
        if len(keep) < n:
            batch.filter(keep)
        if keep:
            self._prompt_batch.extend(batch)
            self._currently_processing.extend(entries[i] for i in keep)
        return responses

    def _align(self, n: int) -> None:
        """Give the next n prompts one length where their cached prefixes allow it.

        A group of prompts of different lengths is right-padded, and mlx-lm then rolls every layer's
        keys and values into place (`BatchKVCache.finalize`): about a tenth of a group's prefill on
        the CPU. Instead a shorter prompt takes its missing tokens back from the end of its cached
        prefix (the cache is trimmed): they are computed in the positions padding would have spent.
        `retaken` keeps the count, so the usage's cached tokens can leave them out.
        """
        rows = list(islice(self._unprocessed_sequences, n))
        lengths = [sum(map(len, row[1])) for row in rows]
        longest = max(lengths)
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            uid, segments, max_tokens, cache, cached, *rest = row
            take = min(longest - length, len(cached))
            if take <= 0 or not can_trim_prompt_cache(cache):
                continue
            trim_prompt_cache(cache, take)
            prompt = cached[-take:] + [t for segment in segments for t in segment]
            # As `insert_segments` leaves them: the last segment is the last token alone.
            segments = [prompt[:-1], prompt[-1:]]
            self._unprocessed_sequences[i] = (
                uid,
                segments,
                max_tokens,
                cache,
                cached[:-take],
                *rest,
            )
            self.retaken[uid] = take

    def _prefill(self, batch: PromptProcessingBatch, prompts: list[list[int]]) -> mx.array:
        """Run every prompt token through the model in one pass; return each row's last hidden state.

        `PromptProcessingBatch.prompt` with the whole prompt, and the last positions kept, and two
        changes for the CPU, where mlx copies slowly:
        - Prompts still shorter than the longest after `_align` have no cached prefix: they are
          left-padded, which needs no roll afterwards. Otherwise (another cache type) mlx-lm's right
          padding and roll.
        - Each layer's cache grows by exactly the prompt length, not by mlx-lm's 256 positions,
          which cost a zero-filled 256-position buffer and a concatenation per layer per group
          (as much as a fifth of a group's prefill). Decoding grows it again in 256-position steps.
        """
        cached = [len(have) for have in batch.tokens]
        for have, new in zip(batch.tokens, prompts, strict=True):
            have += new
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        caches = batch.prompt_cache
        batch_caches = all(isinstance(c, BatchKVCache) for c in caches)
        left = batch_caches and all(c == 0 for c, pad in zip(cached, padding, strict=True) if pad)
        if max(padding) == 0:
            tokens = mx.array(prompts)
        elif left:
            tokens = mx.array([[0] * pad + p for pad, p in zip(padding, prompts, strict=True)])
            extra = mx.array(padding)
            for c in caches:  # what `prepare(left_padding=...)` does, which refuses a filled cache
                c.left_padding = c.left_padding + extra
                c.offset = c.offset - extra
        else:
            tokens = _right_pad_prompts(prompts, max_length=longest)
            for c in caches:
                c.prepare(lengths=lengths, right_padding=padding)
        if batch_caches:
            for c in caches:
                c.step = longest  # over the class's 256, for this pass only
        try:
            with (
                mlx_cpu.shared_positions(caches[0].offset, longest)
                if batch_caches
                else nullcontext()
            ):
                hidden = self._body(tokens, cache=caches)
        finally:
            if batch_caches:
                for c in caches:
                    del c.step
        ends = [longest - 1] * len(prompts) if left else [n - 1 for n in lengths]
        last = hidden[mx.arange(len(prompts)), mx.array(ends)]
        mx.eval([c.state for c in caches], last)
        if max(padding) > 0 and not left:
            for c in caches:
                c.finalize()
            mx.eval([c.state for c in caches])
        mx.clear_cache()
        return last


def _decode_step(self):
    """`GenerationBatch._step` of mlx-lm 0.32, minus the vocabulary log-sum-exp when no row needs it."""
    self._current_tokens = self._next_tokens
    self._current_logprobs = self._next_logprobs
    inputs = self._current_tokens

    logits = self.model(inputs[:, None], cache=self.prompt_cache)
    logits = logits[:, -1, :]

    token_context = []
    if any(self.logits_processors):
        processed_logits = []
        for e in range(len(self.uids)):
            sample_logits = logits[e : e + 1]
            processors = self.logits_processors[e] or ()
            if processors:
                context = self._token_context[e].update_and_fetch(inputs[e : e + 1])
                token_context.append(context)
                for processor in processors:
                    sample_logits = processor(context, sample_logits)
            processed_logits.append(sample_logits)
        logits = mx.concatenate(processed_logits, axis=0)

    if any(uid in self.normalized_uids for uid in self.uids):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        next_logprobs = list(logprobs)
    else:
        logprobs = logits  # only sampled from: the sampled token is the same
        next_logprobs = [self.no_logprobs] * len(self.uids)  # nobody reads them: no row copies

    samplers = [
        self.fallback_sampler if s is None else s
        for s in (self.samplers or [None] * len(self.uids))
    ]
    if not samplers or all(s is samplers[0] for s in samplers):
        sampled = (samplers[0] if samplers else self.fallback_sampler)(logprobs)
    else:
        sampled = mx.concatenate([s(logprobs[e : e + 1]) for e, s in enumerate(samplers)], axis=0)

    self._next_tokens = sampled
    self._next_logprobs = next_logprobs
    mx.async_eval(self._next_tokens, self._next_logprobs, token_context)

    mx.eval(inputs, self._current_logprobs)
    inputs = inputs.tolist()
    for sti, ti in zip(self.tokens, inputs, strict=True):
        sti.append(ti)
    return inputs, self._current_logprobs
