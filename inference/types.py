"""Plain values passed between the API layer and the engine. No Django here."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to load and serve one registry model."""

    name: str
    path: str
    backend: str = "auto"
    kind: str = "chat"  # "chat" | "embedding"
    pooling: str = "mean"  # embedding models: mean | cls | max | last
    normalize: bool = False  # embedding models: unit-length vectors
    max_batch_size: int = 16
    context_length: int | None = None
    chat_template: str | None = None
    pinned: bool = False
    keep_alive: float | None = None  # seconds idle before unloading; None keeps it loaded
    size_bytes: int = 0  # weights on disk: the estimate checked against a memory budget
    prompt_cache_entries: int = 16  # finished sequences' KV caches kept for prefix reuse
    prefill_batch_size: int | None = None  # prompts prefilled together; None: max_batch_size
    # vLLM's engine settings (other backends ignore them); None: the backend's default
    dtype: str = "auto"
    gpu_memory_utilization: float | None = None  # on a CPU: the share of RAM vLLM reserves
    kv_cache_gb: float | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str | None = None
    enforce_eager: bool | None = None
    engine_args_json: str = "{}"  # more AsyncEngineArgs fields, as JSON text (hashable)

    @property
    def load_key(self) -> tuple:
        """A model is reloaded when this changes (its files, its engine), not when a sampling
        default does. vLLM fixes its context length and batch size when its engine starts."""
        if self.backend == "llamacpp":  # llama-server sizes its slots when it starts
            return (
                self.path,
                self.backend,
                self.kind,
                self.context_length,
                self.max_batch_size,
                self.prefill_batch_size,
            )
        if self.backend != "vllm":
            return (self.path, self.backend, self.kind)
        return (
            self.path,
            self.backend,
            self.kind,
            self.context_length,
            self.max_batch_size,
            self.dtype,
            self.gpu_memory_utilization,
            self.kv_cache_gb,
            self.tensor_parallel_size,
            self.pipeline_parallel_size,
            self.quantization,
            self.enforce_eager,
            self.engine_args_json,
        )

    @property
    def engine_args(self) -> dict:
        return json.loads(self.engine_args_json or "{}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class Constraint:
    """What the output must match, compiled once per schema (inference/constraints.py): an
    llguidance grammar, which every backend applies with the same library."""

    kind: str  # "json_schema" (json_object is the schema {"type": "object"}) | "lark"
    source: str  # the JSON schema as text, or the lark grammar (tool calls)
    grammar: str  # llguidance's grammar for it (compact JSON: no free whitespace)
    # Engines without llguidance (llama.cpp) get `auto` tool calls as a lazy grammar: free text
    # until this trigger (its text, and its token id where it is an added token), the grammar
    # from there on. Engines with llguidance follow `grammar` and ignore it.
    trigger: tuple[str, int | None] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: ModelSpec
    prompt_tokens: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    # Applied by engines whose capabilities include stop_strings; otherwise serving filters text.
    stop: tuple[str, ...] = ()
    constraint: Constraint | None = None
    # False when the answer's markers are added tokens (Mistral's [TOOL_CALLS] is a special one):
    # the text keeps them so that they can be read, as vLLM's server does for such parsers.
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class TokenDelta:
    """One generated token, or the end of a sequence (token None with finish_reason set)."""

    token: int | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    # On a sequence's first delta: prompt tokens `add` counted as cached that were computed after all
    recomputed: int = 0
    # On a sequence's first delta: prompt tokens served from the engine's prefix cache
    cached_tokens: int | None = None
    # On a sequence's first delta: seconds it waited for a batch slot, where the engine says
    queue_wait: float | None = None
    # The text this delta adds, from engines that detokenize (capabilities.detokenizes)
    text: str | None = None
    # On the last delta, from engines that apply stop strings: the one that ended the sequence
    stop_string: str | None = None


@dataclass
class EngineStats:
    backend: str
    device: str
    loaded_models: list[dict]
    running: int
    queued: int
    tokens_generated: int
    started_at: float


@dataclass
class RequestStats:
    """One API request's numbers, filled in as it goes and recorded when it ends."""

    endpoint: str
    started: float = field(default_factory=time.monotonic)
    created_at: float = field(default_factory=time.time)
    stream: bool = False
    model: str = ""
    key_id: int | None = None
    key_name: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None  # time.monotonic(), like `started`
    queue_wait: float | None = None
    finish_reason: str = ""
    status_code: int = 200
    error_type: str = ""
    cancelled: bool = False
    recorded: bool = False  # its row is written (or buffered): once per request

    def outcome(self) -> str:
        if self.cancelled:
            return "cancelled"
        if self.status_code >= 500 or self.finish_reason == "error":
            return "server_error"
        if self.status_code >= 400:
            return "client_error"
        return "ok"
