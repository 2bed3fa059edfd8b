"""vLLM backend (Linux + CUDA). Not implemented yet: selecting it says so instead of failing later."""

from __future__ import annotations

from inference.backends.base import Backend, BackendUnavailable, LoadedModel
from inference.types import ModelSpec

IMPLEMENTED = False


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self) -> None:
        raise BackendUnavailable(
            "The vLLM backend is not implemented yet in this version of llm-service. "
            "Set LLM_SERVICE_BACKEND=mlx (or auto) to serve with mlx-lm."
        )

    @property
    def device(self) -> str:  # pragma: no cover - never constructed
        return "cuda"

    def load(self, spec: ModelSpec) -> LoadedModel:  # pragma: no cover - never constructed
        raise BackendUnavailable("vLLM backend not implemented")
