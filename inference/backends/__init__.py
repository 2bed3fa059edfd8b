"""Backends by name, imported lazily so a Mac never imports vLLM and Linux never needs Metal."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from inference.backends.base import Backend, BackendUnavailable

BACKENDS = {
    "mlx": "inference.backends.mlx.MLXBackend",
    "vllm": "inference.backends.vllm.VLLMBackend",
    "llamacpp": "inference.backends.llamacpp.LlamaCppBackend",
}


def cuda_available() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def detect_backend() -> str:
    """macOS -> mlx (Metal); Linux with CUDA and vLLM importable -> vllm; else mlx on the CPU:
    against vLLM's CPU build it answered bursts in half the time to first token, at 0.8-1.0x its
    throughput, and starts in seconds (docs/benchmarks.md, "The vLLM backend")."""
    if sys.platform == "darwin":
        return "mlx"
    if sys.platform.startswith("linux") and cuda_available() and importlib.util.find_spec("vllm"):
        return "vllm"
    return "mlx"


def resolve_backend_name(name: str = "auto") -> str:
    name = detect_backend() if name in ("", "auto") else name
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    return name


def create_backend(name: str = "auto", **options) -> Backend:
    dotted = BACKENDS[resolve_backend_name(name)]
    module_name, _, cls_name = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"the {name} backend is not installed here: {exc}") from exc
    return getattr(module, cls_name)(**options)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailable",
    "create_backend",
    "detect_backend",
    "resolve_backend_name",
]
