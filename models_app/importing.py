"""Registering models from disk: mlx-lm / Hugging Face folders in place; GGUF files as they are
(for llama.cpp) or converted to mlx-lm folders."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from django.conf import settings
from django.db import transaction

from models_app.models import LLMModel


class ImportError_(ValueError):
    """A user-facing reason an import cannot happen."""


def embedding_config(folder: Path) -> dict | None:
    """A sentence-transformers folder's pooling and normalisation (modules.json, 1_Pooling,
    Normalize), as registry fields; None for any other folder."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    fields = {"kind": LLMModel.Kind.EMBEDDING, "pooling": "mean", "normalize": False}
    for module in json.loads(modules.read_text()):
        kind = str(module.get("type", ""))
        if kind.endswith(".Pooling"):
            config_file = folder / module.get("path", "") / "config.json"
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            for mode, name in (
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_lasttoken", "last"),
                ("pooling_mode_mean_tokens", "mean"),
            ):
                if config.get(mode):
                    fields["pooling"] = name
                    break
        elif kind.endswith(".Normalize"):
            fields["normalize"] = True
    return fields


def model_dir(name: str) -> Path:
    """Where an imported or downloaded model's files go: MODELS_DIR/<name with / as -->."""
    return Path(settings.MODELS_DIR) / name.replace("/", "--")


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def default_name(path: Path) -> str:
    stem = path.stem if path.is_file() else path.name
    stem = re.sub(r"\.(Q\d\w*|F16|F32|BF16)$", "", stem, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._:/@+-]+", "-", stem).strip("-").lower() or "model"


def cuda_available() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def gguf_backend(path: Path, requested: str = "auto") -> str:
    """Who serves a GGUF file: llamacpp as shipped, or mlx after conversion. `auto` picks llama.cpp
    where its server is built and the file cannot be converted or there is no GPU (a CPU serves
    the quantized file several times faster than mlx its float32 conversion)."""
    if requested == "vllm":
        raise ImportError_(
            "the vllm backend serves model folders; import a GGUF with llamacpp or mlx"
        )
    if requested in ("llamacpp", "mlx"):
        if requested == "llamacpp" and settings.LLAMA_SERVER is None:
            raise ImportError_(
                "llama.cpp's llama-server is not built here (`make setup` builds it, or set "
                "LLM_SERVICE_LLAMA_SERVER)"
            )
        return requested
    if settings.LLAMA_SERVER is None:
        return "mlx"
    if sys.platform == "darwin" or cuda_available():
        from models_app.gguf import read_gguf_info

        return "mlx" if read_gguf_info(path)["problem"] is None else "llamacpp"
    return "llamacpp"


def gguf_file_problem(path: Path) -> str | None:
    """Why llama.cpp could not read this file (not GGUF, truncated), or None."""
    from models_app.gguf import GGUFError, gguf_truncation

    try:
        return gguf_truncation(path)
    except GGUFError as exc:
        return str(exc)


def import_model(
    path: str | Path,
    *,
    name: str | None = None,
    make_default: bool = False,
    backend: str = "auto",
) -> LLMModel:
    source = Path(path).expanduser().resolve()
    if not source.exists():
        raise ImportError_(f"{source} does not exist")
    name = name or default_name(source)
    if make_default and source.is_dir() and embedding_config(source) is not None:
        raise ImportError_(f"{source} is an embedding model; the default is a chat model")
    if LLMModel.objects.filter(name=name).exists():
        raise ImportError_(f"a model named {name!r} is already registered")

    file_format = LLMModel.Format.MLX
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise ImportError_(
                f"{source} has no config.json: not an mlx-lm / Hugging Face model folder"
            )
        if not any(source.glob("*.safetensors")):
            raise ImportError_(f"{source} has no .safetensors weights")
        target, kind = source, LLMModel.Source.LOCAL
        embedding = embedding_config(source)
        if backend == "llamacpp":
            raise ImportError_("the llamacpp backend serves .gguf files, not model folders")
    elif source.suffix.lower() == ".gguf" and gguf_backend(source, backend) == "llamacpp":
        problem = gguf_file_problem(source)
        if problem:
            raise ImportError_(problem)
        target, kind, embedding = source, LLMModel.Source.GGUF, None
        backend, file_format = "llamacpp", LLMModel.Format.GGUF
    elif source.suffix.lower() == ".gguf":
        from models_app.gguf import GGUFError, convert_gguf

        target = model_dir(name)
        if target.exists():
            raise ImportError_(f"{target} already exists; remove it or pick another --name")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            convert_gguf(source, target)
        except GGUFError as exc:
            raise ImportError_(str(exc)) from exc
        kind = LLMModel.Source.GGUF
        embedding = None
    else:
        raise ImportError_(f"{source} is neither a model folder nor a .gguf file")

    try:
        with transaction.atomic():
            row = LLMModel.objects.create(
                name=name,
                source=kind,
                source_ref=str(source),
                path=str(target),
                backend=backend,
                format=file_format,
                size_bytes=folder_size(target),
                **(embedding or {}),
            )
            # The default model is the one chats get: never an embedding model.
            first_chat = embedding is None and not LLMModel.objects.filter(is_default=True).exists()
            if make_default or first_chat:
                row.make_default()
    except Exception:
        if kind == LLMModel.Source.GGUF and file_format == LLMModel.Format.MLX:
            shutil.rmtree(target, ignore_errors=True)  # nothing half-registered, nothing orphaned
        raise
    return row
