"""The small interface every backend implements. Called only from the scheduler thread."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from inference.types import GenerationRequest, ModelSpec, TokenDelta


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this machine (missing package, no device)."""


class LoadedModel(ABC):
    """One resident model with its own running batch.

    `add` and `remove` take effect at the next `step`; `step` advances every running sequence by
    at most one token and returns what each produced. A finish delta (finish_reason set) is the
    sequence's last; after it the sequence is gone from the batch.
    """

    spec: ModelSpec
    tokenizer: Any  # a Hugging Face tokenizer: encode, decode, apply_chat_template, ...
    context_length: int
    memory_bytes: int
    eos_token_ids: frozenset[int]

    @abstractmethod
    def add(self, seq_id: int, request: GenerationRequest) -> int | None:
        """Join the batch at the next step; returns how many prompt tokens came from a cache."""

    @abstractmethod
    def remove(self, seq_ids: list[int]) -> None: ...

    @abstractmethod
    def step(self) -> list[tuple[int, TokenDelta]]: ...

    @abstractmethod
    def reset(self) -> None:
        """Drop every sequence (after an error), keeping the weights."""

    def set_max_batch_size(self, size: int) -> None:  # noqa: B027 - optional hook
        """Change how many sequences decode together, if the backend supports it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the model holds."""


class Backend(ABC):
    name: str

    @property
    @abstractmethod
    def device(self) -> str:
        """A short human description, e.g. "cpu" or "metal" or "cuda:0"."""

    @abstractmethod
    def load(self, spec: ModelSpec) -> LoadedModel: ...
