"""Backends by name, imported lazily so a Mac never imports vLLM and Linux never needs Metal."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import platform
import sys

from inference.backends.base import Backend, BackendUnavailable

log = logging.getLogger(__name__)

BACKENDS = {
    "mlx": "inference.backends.mlx.MLXBackend",
    "vllm": "inference.backends.vllm.VLLMBackend",
}


def cuda_available() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def detect_backend() -> str:
    """macOS arm64 -> mlx (Metal); Linux with CUDA and vLLM importable -> vllm; else mlx on CPU."""
    if sys.platform == "darwin":
        return "mlx"
    if sys.platform.startswith("linux") and cuda_available() and importlib.util.find_spec("vllm"):
        from inference.backends.vllm import IMPLEMENTED

        if IMPLEMENTED:
            return "vllm"
        log.warning(
            "CUDA and vLLM found, but the vLLM backend is not implemented yet in this version: "
            "serving with mlx on the CPU (machine %s).",
            platform.machine(),
        )
    return "mlx"


def create_backend(name: str = "auto") -> Backend:
    if name == "auto":
        name = detect_backend()
    try:
        dotted = BACKENDS[name]
    except KeyError:
        raise BackendUnavailable(
            f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}"
        ) from None
    module_name, _, cls_name = dotted.rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)()


__all__ = ["Backend", "BackendUnavailable", "create_backend", "detect_backend", "BACKENDS"]
