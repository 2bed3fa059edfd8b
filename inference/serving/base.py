"""What every API's serving shares: the model row to plain values, prompts, sampling defaults,
the context check, the engine walk (submit, run to end, SSE framing) and the default model's
preload. One module per API sits beside it (chat, completions), as in vLLM's entrypoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import orjson
from django.conf import settings
from django.http import StreamingHttpResponse

from inference import protocol
from inference.answer import AnswerReader
from inference.backends.base import LoadedModel
from inference.engine import (
    EngineConfig,
    GenerationGroup,
    ModelBusy,
    NotResident,
    QueueFull,
    current_engine,
    get_engine,
)
from inference.text import Detokenizer, StopFilter, TokenTexts
from inference.tools import added_tokens
from inference.types import (
    Constraint,
    GenerationRequest,
    ModelSpec,
    RequestStats,
    SamplingParams,
    TokenDelta,
)
from llmservice.errors import APIError, error_body, model_not_found
from llmservice.lookups import shared_query
from models_app.models import LLMModel

log = logging.getLogger(__name__)
# Prompts and answers are the users' data: this logger is off unless LLM_SERVICE_LOG_PROMPTS is
# set (llmservice/settings.py, LOGGING), whatever the log level.
prompt_log = logging.getLogger("llmservice.prompts")
T = TypeVar("T")

FINGERPRINT = "fp_llm_service"


def engine():
    # The config matters only to the first call, which creates the engine.
    return current_engine() or get_engine(
        EngineConfig(
            backend=settings.BACKEND,
            max_queue=settings.MAX_QUEUE,
            max_loaded_models=settings.MAX_LOADED_MODELS,
            memory_budget_bytes=int(settings.MEMORY_BUDGET_GB * 1e9),
            llama_server=str(settings.LLAMA_SERVER or ""),
            llamacpp_threads=settings.LLAMACPP_THREADS,
            cache_dir=str(settings.DATA_DIR / "cache"),
        )
    )


# --- the model row -> plain values ------------------------------------------------------------


@dataclass(frozen=True)
class ModelDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    system_prompt: str = ""
    tool_parser: str = ""  # "" (from the template) | a format in inference/tools.py | "none"
    reasoning_parser: str = "auto"  # auto | think | none


def spec_from_row(row: LLMModel) -> ModelSpec:
    return ModelSpec(
        name=row.name,
        path=row.path,
        # A GGUF file (not converted) is served by llama.cpp whatever the default backend is.
        backend="llamacpp" if row.format == LLMModel.Format.GGUF else row.backend,
        kind=row.kind,
        pooling=row.pooling or "mean",
        normalize=row.normalize,
        max_batch_size=row.max_batch_size or settings.MAX_BATCH_SIZE,
        context_length=row.context_length,
        chat_template=row.chat_template or None,
        pinned=row.pinned,
        keep_alive=float(row.keep_alive_seconds) if row.keep_alive_seconds is not None else None,
        size_bytes=row.size_bytes,
        prompt_cache_entries=settings.PROMPT_CACHE_ENTRIES,
        prefill_batch_size=settings.PREFILL_BATCH_SIZE or None,
        dtype=row.dtype,
        gpu_memory_utilization=row.gpu_memory_utilization,
        kv_cache_gb=row.kv_cache_gb,
        tensor_parallel_size=row.tensor_parallel_size,
        pipeline_parallel_size=row.pipeline_parallel_size,
        quantization=row.quantization or None,
        enforce_eager=row.enforce_eager,
        engine_args_json=json.dumps(row.engine_args or {}, sort_keys=True),
    )


def defaults_from_row(row: LLMModel) -> ModelDefaults:
    return ModelDefaults(
        temperature=row.default_temperature,
        top_p=row.default_top_p,
        top_k=row.default_top_k,
        min_p=row.default_min_p,
        max_tokens=row.default_max_tokens,
        presence_penalty=row.default_presence_penalty,
        frequency_penalty=row.default_frequency_penalty,
        repetition_penalty=row.default_repetition_penalty,
        system_prompt=row.system_prompt,
        tool_parser=row.tool_parser,
        reasoning_parser=row.reasoning_parser,
    )


async def resolve_model(
    name: str,
    stats: RequestStats | None = None,
    allowed: tuple[str, ...] = (),
    kind: str = "chat",
) -> tuple[ModelSpec, ModelDefaults]:
    """The registry row `name` means, as plain values; 404 when there is none the caller may
    use, 400 when it is of another kind (an embedding model asked to chat, or the reverse)."""
    row = await shared_query(("model", name), lambda: LLMModel.objects.servable().find(name))
    if row is None:
        running = current_engine()
        if running is not None and name in {m.name for m in running.loaded()}:
            # Removed or disabled in the registry: free its memory (after any requests in flight).
            running.unload_in_background(name)
        raise model_not_found(name)
    if allowed and row.name not in allowed:
        raise model_not_found(name)
    if stats is not None:
        stats.model = row.name
    if row.kind != kind:
        wanted = "/v1/embeddings" if row.kind == "embedding" else "chat and completions"
        raise APIError(
            400,
            f"Model `{row.name}` is {'an embedding' if row.kind == 'embedding' else 'a chat'} "
            f"model: use it with {wanted}.",
            param="model",
            code="wrong_model_kind",
        )
    return spec_from_row(row), defaults_from_row(row)


# Models loaded (and so held) for the current request that it has not started on yet: let go
# when the request ends (llmservice/asgi.py), so one refused after the load (its prompt too long,
# its client gone) does not keep its model from being unloaded.
_unstarted: ContextVar[list[ModelSpec] | None] = ContextVar("unstarted_models", default=None)


@contextlib.contextmanager
def holds_released() -> Iterator[None]:
    token = _unstarted.set([])
    try:
        yield
    finally:
        pending = _unstarted.get()
        _unstarted.reset(token)
        running = current_engine()
        for spec in pending or ():
            if running is not None:
                running.unhold(spec)


def _started(spec: ModelSpec) -> None:
    pending = _unstarted.get()
    if pending and spec in pending:
        pending.remove(spec)


async def load_model(spec: ModelSpec) -> LoadedModel:
    try:
        model = await engine().load(spec)
        pending = _unstarted.get()
        if pending is not None:
            pending.append(spec)
        return model
    except ModelBusy as exc:
        raise APIError(
            503,
            f"Model `{spec.name}` cannot be loaded now: {exc}",
            type="server_error",
            code="model_busy",
            headers={"Retry-After": "5"},
        ) from exc
    except Exception as exc:
        log.exception("loading %s failed", spec.name)
        raise APIError(
            503,
            f"Model `{spec.name}` failed to load: {exc}",
            type="server_error",
            code="model_load_failed",
            headers={"Retry-After": "30"},
        ) from exc


# --- prompts ---------------------------------------------------------------------------------


def chat_template(model: LoadedModel, spec: ModelSpec) -> str | None:
    # The spec is read from the registry per request, so a template change applies at once.
    return spec.chat_template or getattr(model.tokenizer, "chat_template", None)


def render_chat(
    model: LoadedModel,
    spec: ModelSpec,
    messages: list[dict],
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
) -> list[int]:
    """The prompt's tokens: messages (and tools, for a template that renders them) through the
    model's chat template; `template_kwargs` reach templates that read them.

    Message contents are data: text in them that spells a special token (`<|im_end|>`, ...) is
    tokenized as text, never as the control token, so a message cannot close its turn or open a
    system one. Such contents go through the template as placeholders and are tokenized apart."""
    tokenizer = model.tokenizer
    markers = _special_texts(tokenizer)
    risky = {
        i: f"\ue000{i}\ue001"
        for i, m in enumerate(messages)
        if isinstance(m.get("content"), str) and any(s in m["content"] for s in markers)
    }
    if not risky:
        return tokenizer.encode(
            _render(model, spec, messages, tools, template_kwargs), add_special_tokens=False
        )
    masked = [dict(m, content=risky[i]) if i in risky else m for i, m in enumerate(messages)]
    text = _render(model, spec, masked, tools, template_kwargs)
    if any(text.count(placeholder) != 1 for placeholder in risky.values()):
        # The template rewrote the content (stripped, split it): break the markers up instead.
        defused = [
            dict(m, content=_defuse(m["content"], markers)) if i in risky else m
            for i, m in enumerate(messages)
        ]
        text = _render(model, spec, defused, tools, template_kwargs)
        return tokenizer.encode(text, add_special_tokens=False)
    contents = {risky[i]: messages[i]["content"] for i in risky}
    ids: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, contents)) + ")", text):
        if piece in contents:
            ids += tokenizer.encode(
                contents[piece], add_special_tokens=False, split_special_tokens=True
            )
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def _render(
    model: LoadedModel,
    spec: ModelSpec,
    messages: list[dict],
    tools: list[dict] | None,
    template_kwargs: dict | None,
) -> str:
    template = chat_template(model, spec)
    if not template:
        # A base model without a template: a plain transcript it can continue.
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    try:
        return model.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=True,
            tokenize=False,
            chat_template=template,
            **(template_kwargs or {}),
        )
    except Exception as exc:
        raise APIError(
            400, f"The chat template could not render these messages: {exc}", param="messages"
        ) from exc


# Per tokenizer: the texts of its special tokens.
_specials: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _special_texts(tokenizer: Any) -> tuple[str, ...]:
    if tokenizer not in _specials:
        texts = {text for text, (_, special) in added_tokens(tokenizer).items() if special}
        texts |= set(getattr(tokenizer, "all_special_tokens", ()) or ())
        _specials[tokenizer] = tuple(sorted(t for t in texts if t))
    return _specials[tokenizer]


def _defuse(content: str, markers: tuple[str, ...]) -> str:
    """Markers with a zero-width space after their first character: read alike, tokenized as
    text."""
    for marker in markers:
        content = content.replace(marker, marker[0] + "\u200b" + marker[1:])
    return content


def encode_prompt(model: LoadedModel, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        vocab = len(model.tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return prompt
    return model.tokenizer.encode(prompt)


def sampling_params(
    request: protocol.SamplingFields,
    defaults: ModelDefaults,
    max_tokens: int,
    *,
    logprobs: bool,
    top_logprobs: int,
    vocab: int,
) -> SamplingParams:
    def pick(value, default, fallback):
        return value if value is not None else (default if default is not None else fallback)

    bias: tuple[tuple[int, float], ...] = ()
    if request.logit_bias:
        bias = tuple((int(k), float(v)) for k, v in request.logit_bias.items())
        bad = [k for k, _ in bias if k >= vocab]
        if bad:
            raise APIError(
                400,
                f"logit_bias token id {bad[0]} is outside the vocabulary (size {vocab})",
                param="logit_bias",
            )
    top_k = pick(request.top_k, defaults.top_k, 0)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick(request.temperature, defaults.temperature, 1.0),
        top_p=pick(request.top_p, defaults.top_p, 1.0),
        top_k=max(top_k, 0),
        min_p=pick(request.min_p, defaults.min_p, 0.0),
        seed=request.seed,
        presence_penalty=pick(request.presence_penalty, defaults.presence_penalty, 0.0),
        frequency_penalty=pick(request.frequency_penalty, defaults.frequency_penalty, 0.0),
        repetition_penalty=pick(request.repetition_penalty, defaults.repetition_penalty, 1.0),
        logit_bias=bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def budget(
    model: LoadedModel,
    spec: ModelSpec,
    prompt_len: int,
    requested: int | None,
    defaults: ModelDefaults,
    param: str,
) -> int:
    """max_tokens for this request, or a 400 when prompt + completion exceed the context."""
    # A per-model setting lowers the model's own limit; the model cannot go past its own.
    ctx = min(spec.context_length or model.context_length, model.context_length)
    max_tokens = requested if requested is not None else defaults.max_tokens
    if max_tokens is None:
        max_tokens = ctx - prompt_len
    if prompt_len + max_tokens > ctx or max_tokens < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{prompt_len + max(max_tokens, 0)} tokens ({prompt_len} in the {param}, "
            f"{max(max_tokens, 0)} in the completion). Please reduce the length of the {param} "
            "or the completion.",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


# --- tokens -> text --------------------------------------------------------------------------


# Per loaded model; an unloaded model's entry goes with it.
_token_texts: weakref.WeakKeyDictionary[LoadedModel, TokenTexts] = weakref.WeakKeyDictionary()


def token_texts(model: LoadedModel) -> TokenTexts:
    if model not in _token_texts:
        _token_texts[model] = TokenTexts(model.tokenizer)
    return _token_texts[model]


@dataclass
class Choice:
    index: int
    detok: Detokenizer | None  # None when the engine detokenizes and applies stop strings
    stops: StopFilter
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[tuple[int, float, tuple]] = field(default_factory=list)
    reader: AnswerReader | None = None  # chat: reasoning and tool calls apart from content
    stop_string: str | None = None  # the stop string that ended it, if one did

    def feed(self, delta: TokenDelta) -> str:
        """Text this delta releases; sets finish_reason when the sequence ends here."""
        if self.finish_reason is not None:
            return ""
        out = self._feed(delta)
        if self.reader is not None:
            self.reader.feed(out, token=delta.token, final=self.finish_reason is not None)
        return out

    def _feed(self, delta: TokenDelta) -> str:
        out = ""
        if self.detok is None:  # the engine's own text, its stop strings already applied
            if delta.token is not None:
                self.tokens += 1
                if delta.logprob is not None:
                    self.logprobs.append((delta.token, delta.logprob, delta.top_logprobs))
            out = delta.text or ""
            if delta.finish_reason is not None:
                self.finish_reason = delta.finish_reason
                self.error = delta.error
                self.stop_string = delta.stop_string
            self.text += out
            return out
        if delta.token is not None:
            self.tokens += 1
            if delta.logprob is not None:
                self.logprobs.append((delta.token, delta.logprob, delta.top_logprobs))
            out, hit = self.stops.feed(self.detok.add(delta.token))
            if hit:
                self.finish_reason, self.stop_string = "stop", self.stops.matched
                self.text += out
                return out
        if delta.finish_reason is not None:
            if delta.finish_reason == "error":
                self.finish_reason, self.error = "error", delta.error
            else:
                tail, hit = self.stops.feed(self.detok.flush())
                out += tail + ("" if hit else self.stops.flush())
                self.finish_reason = "stop" if hit else delta.finish_reason
                self.stop_string = self.stops.matched if hit else None
        self.text += out
        return out


# --- the shared walk -------------------------------------------------------------------------


@dataclass
class Job:
    """One API request on its way through the engine."""

    kind: str  # "chat" | "completion"
    id: str
    created: int
    spec: ModelSpec
    model: LoadedModel
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stops: list[str]
    include_usage: bool
    echo_texts: list[str] = field(default_factory=list)
    top_logprobs: int = 0
    started: float = field(default_factory=time.monotonic)
    stats: RequestStats | None = None
    group: GenerationGroup | None = None
    constraint: Constraint | None = None
    reader: Callable[[], AnswerReader] | None = None  # chat: reads reasoning and tool calls
    skip_special_tokens: bool = True

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (once submitted)."""
        return min(self.group.cached_tokens, self.prompt_tokens) if self.group else 0

    def usage(self, completion_tokens: int, reasoning_tokens: int | None = None) -> dict:
        return protocol.usage(
            self.prompt_tokens, completion_tokens, self.cached_tokens, reasoning_tokens
        )

    def note(self, group: GenerationGroup, choices: list[Choice]) -> None:
        """Copy what analytics wants into the request's stats (plain attribute writes), and log
        the prompt and answers where that is enabled."""
        if prompt_log.isEnabledFor(logging.INFO):
            prompt_log.info(
                "%s %s %s prompt=%s answers=%s",
                self.id,
                self.kind,
                self.spec.name,
                json.dumps(
                    [self.model.tokenizer.decode(p) for p in self.prompts], ensure_ascii=False
                ),
                json.dumps([c.text for c in choices], ensure_ascii=False),
            )
        if self.stats is None:
            return
        self.stats.completion_tokens = sum(c.tokens for c in choices)
        self.stats.first_token_at = group.first_token_at
        self.stats.queue_wait = group.queue_wait
        reasons = [c.finish_reason for c in choices if c.finish_reason]
        self.stats.finish_reason = (
            "error" if "error" in reasons else (reasons[0] if reasons else "")
        )

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def requests(self) -> list[GenerationRequest]:
        stop = tuple(self.stops) if self.model.capabilities.stop_strings else ()
        out = []
        for p_index, prompt in enumerate(self.prompts):
            for i in range(self.n):
                params = self.params
                if params.seed is not None and self.n > 1:
                    # Reproducible but different choices, as with OpenAI's n and seed.
                    params = replace(params, seed=params.seed + i)
                out.append(
                    GenerationRequest(
                        f"{self.id}-{p_index}-{i}",
                        self.spec,
                        tuple(prompt),
                        params,
                        stop,
                        self.constraint,
                        self.skip_special_tokens,
                    )
                )
        return out

    def choices(self) -> list[Choice]:
        native = self.model.capabilities.detokenizes
        return [
            Choice(
                i,
                None if native else Detokenizer(self.model.tokenizer, self.skip_special_tokens),
                StopFilter([] if native else self.stops),
                reader=self.reader() if self.reader else None,
            )
            for i in range(len(self.prompts) * self.n)
        ]


async def while_resident(
    spec: ModelSpec,
    action: Callable[[], Awaitable[T]],
    reloaded: Callable[[LoadedModel], None] = lambda model: None,
) -> T:
    """`action()` on `spec`'s resident model, loading it again (and telling `reloaded`) if it
    was unloaded to make room since this request loaded it: a few times, then 503."""
    for _ in range(3):
        try:
            result = await action()
        except NotResident:
            reloaded(await load_model(spec))
        else:
            _started(spec)  # its checkout took the hold over
            return result
    raise APIError(
        503,
        f"Model `{spec.name}` keeps being unloaded to make room for others.",
        type="server_error",
        code="model_busy",
        headers={"Retry-After": "5"},
    )


async def submit(job: Job) -> GenerationGroup:
    if job.stats is not None:
        job.stats.prompt_tokens = job.prompt_tokens  # as usage reports it: once, whatever n is

    async def start() -> GenerationGroup:
        job.group = engine().submit(job.spec, job.requests())
        return job.group

    def reloaded(model: LoadedModel) -> None:
        job.model = model

    try:
        return await while_resident(job.spec, start, reloaded)
    except QueueFull:
        raise APIError(
            429,
            "The server is busy: too many requests are waiting. Please retry shortly.",
            type="rate_limit_exceeded",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None


LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    """A log-probability JSON can carry: a token the sampler ruled out (a grammar, logit_bias)
    has -inf, which JSON has no number for. vLLM's floor."""
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def sse(data: dict | str) -> bytes:
    """One event, as bytes (a str part would cost Django a charset lookup per event). orjson
    writes compact UTF-8 in one call; streaming a token runs this once, so it is most of the
    JSON work per token."""
    if isinstance(data, str):
        return b"data: " + data.encode() + b"\n\n"
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def run_to_end(job: Job) -> list[Choice]:
    group = await submit(job)
    choices = job.choices()
    try:
        async for index, delta in group:
            choice = choices[index]
            choice.feed(delta)
            if choice.finish_reason is not None and index in group.open:
                group.cancel(index)  # a stop string ended it early: free the slot now
    finally:
        group.cancel()
        job.note(group, choices)
    errors = [c.error for c in choices if c.finish_reason == "error"]
    if errors:
        raise APIError(500, f"Generation failed: {errors[0]}", type="server_error")
    return choices


async def stream_events(
    job: Job,
    group: GenerationGroup,
    chunk: Callable[[Choice, str, bool], list[dict]],
    first: Callable[[int], dict] | None,
) -> AsyncIterator[bytes]:
    """SSE events for a submitted job: `chunk(choice, text, final)` builds the chunks a choice's
    new text makes (none while a reader holds text back, always one with the finish reason)."""
    choices = job.choices()
    try:
        if first is not None:
            for choice in choices:
                yield sse(first(choice.index))
        async for index, delta in group:
            choice = choices[index]
            text = choice.feed(delta)
            if choice.finish_reason == "error":
                group.cancel()
                yield sse(error_body(f"Generation failed: {choice.error}", "server_error"))
                yield sse("[DONE]")
                return
            if choice.finish_reason is not None:
                if index in group.open:
                    group.cancel(index)
                for frame in chunk(choice, text, True):
                    yield sse(frame)
            elif text or (delta.logprob is not None):
                for frame in chunk(choice, text, False):
                    yield sse(frame)
        if job.include_usage:
            yield sse(usage_chunk(job, choices))
        yield sse("[DONE]")
    finally:
        # Runs on normal end and on client disconnect (CancelledError): the slot is freed.
        group.cancel()
        job.note(group, choices)


def usage_chunk(job: Job, choices: list[Choice]) -> dict:
    u = job.usage(sum(c.tokens for c in choices), reasoning_tokens(choices))
    if job.kind == "chat":
        return protocol.chat_chunk(job.id, job.created, job.spec.name, [], FINGERPRINT, u)
    return protocol.text_completion(job.id, job.created, job.spec.name, [], u, FINGERPRINT)


def reasoning_tokens(choices: list[Choice]) -> int | None:
    """Tokens the answers spent reasoning, where a reasoning parser read them (chat)."""
    readers = [c.reader for c in choices if c.reader is not None]
    return sum(r.reasoning_tokens for r in readers) if readers else None


def streaming_response(
    events: AsyncIterator[bytes], group: GenerationGroup
) -> StreamingHttpResponse:
    response = StreamingHttpResponse(events, content_type="text/event-stream")
    # If the client leaves before the first byte, the generator never runs its `finally`.
    response._resource_closers.append(group.cancel)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


# --- loading the default model at start --------------------------------------------------------


@dataclass
class PreloadState:
    model: str | None = None
    status: str = "idle"  # idle | loading | ready | failed | none (no default model)
    error: str = ""


preload = PreloadState()


def start_preload() -> None:
    """Load the default model in the background so the first request does not wait for it."""
    import threading

    def run() -> None:
        from django.db import close_old_connections

        try:
            row = LLMModel.objects.servable().filter(is_default=True).first()
            if row is None:
                preload.status = "none"
                return
            preload.model, preload.status = row.name, "loading"
            engine().load_in_background(spec_from_row(row)).result()
            preload.status = "ready"
        except Exception as exc:
            from llmservice.lifecycle import lifecycle

            if lifecycle.draining:  # the stop ended the load (Backend.interrupt)
                log.info("preloading the default model stopped: the server is stopping")
            else:
                log.exception("preloading the default model failed")
            preload.status, preload.error = "failed", str(exc)
        finally:
            close_old_connections()

    preload.status = "loading"
    threading.Thread(target=run, name="preload-default-model", daemon=True).start()
