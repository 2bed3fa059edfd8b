"""The request-level contract every backend offers the engine. No Django here.

A backend loads models; a loaded model serves requests: `generate(request)` queues one sequence and
returns an async iterator of its TokenDeltas, `abort(request_id)` drops it. How the engine batches
(mlx-lm's BatchGenerator stepped by our thread, vLLM's own scheduler in its engine core process)
stays inside the backend. `capabilities` says what the engine does natively, so serving adds only
what is missing (detokenizing and stop strings for mlx, nothing of that for vLLM).
"""

from __future__ import annotations

import contextlib
import signal
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from inference.types import Constraint, GenerationRequest, ModelSpec, TokenDelta


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this machine (missing package, no device)."""


class QueueFull(Exception):
    """More requests are waiting than the admission queue allows."""


class ModelBusy(Exception):
    """A model cannot be loaded (pinned models or the memory budget leave no room)."""


def exit_description(code: int) -> str:
    """A process's exit status as a person reads it: "exit code 1", "killed by SIGKILL"."""
    if code < 0:
        with contextlib.suppress(ValueError):  # a signal without a name (real-time ones)
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@dataclass(frozen=True)
class Capabilities:
    """What a loaded model's engine does itself."""

    detokenizes: bool = False  # deltas carry `text`; serving must not detokenize again
    stop_strings: bool = False  # the engine ends sequences at `request.stop`, text excluded
    prefix_cache: bool = False  # deltas report cached prompt tokens
    constrained: bool = False  # follows `request.constraint` (llguidance grammars)
    # follows JSON-schema constraints (`constraint.source`) its own way; no other grammars
    json_schema: bool = False
    # follows forced tool calls' lark grammars (no regexes: inference/gbnf.py) its own way
    tool_grammars: bool = False
    continuous_batching: bool = True


class LoadedModel(ABC):
    """One resident model. `generate` and `abort` may be called from any thread or event loop."""

    spec: ModelSpec
    backend_name: str
    tokenizer: Any  # a Hugging Face tokenizer: encode, decode, apply_chat_template, ...
    context_length: int
    memory_bytes: int
    eos_token_ids: frozenset[int]
    capabilities: Capabilities = Capabilities()

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Queue `request` now (raises QueueFull, submitting nothing, past the admission limit)
        and return its deltas; the last one has `finish_reason` set. Iterate on the calling
        loop. Leaving the iteration early (cancelled, closed) aborts the request, as `abort`
        does."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Drop the request wherever it is (waiting, prefilling, decoding); never blocks."""

    def refusal(self, constraint: Constraint) -> str | None:
        """Why this engine cannot follow `constraint` (one that keeps to its capabilities), or
        None; asked before the request is queued, so the answer is a 400."""
        return None

    def update_spec(self, spec: ModelSpec) -> None:  # noqa: B027 - optional hook
        """Settings that apply without reloading (batch size, prompt cache size)."""
        self.spec = spec

    @property
    def alive(self) -> bool:
        """False once it can serve nothing more (a runner process that died): the residency drops
        it, and the next request loads it again."""
        return True

    @property
    def running(self) -> int:
        return 0

    @property
    def queued(self) -> int:
        return 0

    @property
    def engine_requests(self) -> int:
        """Requests the engine itself still holds (for vLLM, as its own bookkeeping says): after
        every client left, this must reach 0."""
        return self.running + self.queued

    def cache_bytes(self) -> dict[str, int]:
        """Memory of the caches that grow with use, by kind ("kv": running sequences', "prompt":
        finished ones kept for prefix reuse); {} where the engine preallocates them (vLLM)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the model holds (weights, KV cache, engine processes)."""


class EmbeddingModel(LoadedModel):
    """A resident embedding model: `embed` turns token lists into vectors; concurrent calls are
    batched by the backend. It generates nothing."""

    dimensions: int

    @abstractmethod
    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One vector per input, pooled and (if the model says so) normalised."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        raise TypeError(f"{self.spec.name!r} is an embedding model; it does not generate")

    def abort(self, request_id: str) -> None:
        return None


class Backend(ABC):
    name: str

    @property
    @abstractmethod
    def device(self) -> str:
        """A short human description, e.g. "cpu" or "metal" or "cuda:0"."""

    @abstractmethod
    def load(self, spec: ModelSpec) -> LoadedModel:
        """Load a model; blocks (the residency manager calls it off the event loop)."""

    @property
    def tokens_generated(self) -> int:
        return 0

    def announce(self, count: int) -> None:  # noqa: B027 - optional hook
        """`count` generation requests are on their way (+1 on arrival, -1 once submitted)."""

    def interrupt(self) -> None:  # noqa: B027 - optional hook
        """The process is stopping: end a load in progress now if it can be (it then raises)
        and start no other."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop the backend's threads; models are closed before this."""
