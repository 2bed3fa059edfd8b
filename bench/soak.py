"""Soak test: one llm-service server under mixed load for a long while, watched for leaks.

Run it from the repository root (a quiet machine is not needed: nothing here is a speed target):

    .venv/bin/python bench/soak.py                        # 30 minutes, writes docs/reliability.md
    .venv/bin/python bench/soak.py --minutes 2 --no-docs  # a quick look, report on stdout only
    .venv/bin/python bench/soak.py --minutes 60 --workers 6 --json /tmp/soak.json

What it does:

1. Server: `llm-service serve --no-demo --no-worker` on a fresh data dir (serve_bench's environment:
   OpenBLAS preloaded when installed), after `manage.py migrate` and three imports: the float32
   SmolLM2-135M-Instruct folder (serve_bench's model) twice, as `soak-a` (the default) and
   `soak-b`, and all-MiniLM-L6-v2 as `minilm`. With LLM_SERVICE_MAX_LOADED_MODELS=2 the three
   cannot all be resident, so traffic that moves between them makes the server unload and load
   models all along (inference/residency.py: the least recently used idle model goes). Each kind
   of request has its own API key (`soak-<kind>`), so the analytics rows can be matched kind by
   kind; the `limited` kind's key has a requests-per-minute limit.
2. Load: `--workers` asyncio workers, each sending one request at a time, picked at random by
   weight (`--seed` makes the sequence repeatable): chat completions (`chat`), streamed ones read
   to the end (`chat_stream`), streamed ones dropped on purpose after k content chunks
   (`chat_drop`, k random from 0, i.e. right after the headers; these ask for many tokens with
   the end-of-turn tokens banned, so the server is still generating when the client leaves), chat
   with `tools` (tool_choice auto or required, parallel calls allowed or not), /v1/embeddings,
   /v1/completions (streamed or not), Anthropic's /v1/messages (streamed or not), deliberately
   bad requests that must get a 4xx (`bad`), and GET /v1/models on the rate-limited key
   (`limited`: a 200 or a 429 with Retry-After). Chat requests pick `soak-a` or `soak-b` at
   random. One request of each kind is sent first, as a warm-up, before the clock starts.
3. Outcomes: a 2xx whose body has the right shape is ok; a 4xx on a `bad` request is expected; a
   429 with Retry-After is shed load (allowed); everything else is an error: any 5xx, an
   unexpected 4xx, a 200 with a wrong body or an error event in its stream, a stream that ends
   without its terminator, a dropped connection the client did not drop, a request that
   exceeds `--request-timeout`. (So a 503 is an error even with its Retry-After.)
4. Samples, at the start and every `--interval` seconds (default 60): RSS of the server's process
   tree (psutil, children included; shared pages count once per process), and from /metrics the
   running and queued sequences and the loaded models. The peak RSS is polled more often.
   Requests are put in the window in which they ended; chat latency percentiles are over `chat`
   and `chat_stream` requests that succeeded.
5. The end: no new requests after `--minutes`; the ones in flight finish. Then it waits for
   /metrics to report no running or queued sequence, and for the analytics rows (the recorder
   writes about once a second) to reach the count of requests the server recorded
   (llm_requests_total). It compares the rows of the server's SQLite database (table
   analytics_requestlog) with what the client saw, by key, status and outcome: one row per
   request that got an answer, and one `cancelled` row per stream dropped on purpose. After the
   server is stopped (SIGTERM), it counts the rows again, and reads the server log for errors,
   loads and unloads, and the requests in flight that the stop had to wait for.
6. Output: a markdown report on stdout and, unless `--no-docs`, in docs/reliability.md between
   `<!-- soak:start -->` and `<!-- soak:end -->` (the file is made when absent; the rest is kept);
   `--json PATH` dumps the raw numbers. The exit code is 1 when a problem was found.

The server log goes to `.cache/bench/logs/soak.log`; the data dir is removed unless `--keep-data`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import constrained_bench as cb  # noqa: E402
import serve_bench as sb  # noqa: E402

MARK_START = "<!-- soak:start -->"
MARK_END = "<!-- soak:end -->"
DOCS = sb.REPO / "docs" / "reliability.md"
LOG_PATH = sb.LOG_DIR / "soak.log"
EMBED_MODEL = sb.REPO / ".cache" / "all-minilm-l6-v2"
CHAT_MODELS = ("soak-a", "soak-b")
EMBED_NAME = "minilm"
MAX_LOADED_MODELS = 2  # one fewer than the models the load uses
MAX_BATCH = 16  # LLM_SERVICE_MAX_BATCH_SIZE: the server's default
LIMITED_RPM = 2  # the `limited` key's requests per minute: low, so that it is reached
STARTUP_TIMEOUT = 600.0
IDLE_TIMEOUT = 180.0  # waiting for running and queued sequences to reach zero
ANALYTICS_TIMEOUT = 60.0  # waiting for the recorder's rows to catch up
SETTLE_SECONDS = 3.0  # the row count must hold this long (a few recorder flushes)
PEAK_POLL = 5.0  # seconds between RSS polls for the peak
MAX_DROP_CHUNKS = 8
SHED_PAUSE_CAP = 5.0  # a worker told to retry later waits at most this long

# Relative frequencies of the kinds of requests.
WEIGHTS = {
    "chat": 3,
    "chat_stream": 3,
    "chat_drop": 2,
    "chat_tools": 2,
    "embeddings": 2,
    "completions": 2,
    "messages": 2,
    "bad": 2,
    "limited": 2,
}
KINDS = tuple(WEIGHTS)
LATENCY_KINDS = ("chat", "chat_stream")
OUTCOMES = ("ok", "expected_4xx", "shed", "dropped", "error")
BAD_VARIANTS = (
    "invalid_json",
    "unknown_model",
    "negative_max_tokens",
    "huge_n",
    "no_messages",
    "embedding_model_for_chat",
    "required_without_tools",
    "messages_without_max_tokens",
    "empty_embedding_input",
    "wrong_key",
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string"}},
                "required": ["zone"],
            },
        },
    },
]
CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Perth")
SENTENCES = [
    f"Note {i}: {topic} matter to people who work with them every day."
    for i, topic in enumerate(
        ["rivers", "markets", "compilers", "gardens", "trains", "bridges"] * 4
    )
]


# --- results --------------------------------------------------------------------------------


@dataclass
class Result:
    kind: str
    variant: str = ""  # the model, the bad input, streamed or not, ...
    start: float = 0.0  # seconds since the load began (negative for the warm-up)
    end: float = 0.0
    status: int | None = None  # HTTP status, once the headers arrived
    outcome: str = "error"  # one of OUTCOMES
    error: str = ""  # for errors: the class they are counted under
    detail: str = ""  # for errors and 4xx: what the server or the client said
    stream_error: bool = False  # a 200 whose stream carried an error event
    retry_after: float | None = None  # seconds, on a 429
    warmup: bool = False

    @property
    def latency(self) -> float:
        return self.end - self.start

    def fail(self, error: str, detail: str = "") -> None:
        self.outcome, self.error, self.detail = "error", error, detail[:300]


@dataclass
class Sample:
    label: str
    at: float  # seconds since the load began
    rss_mb: float | None
    processes: int
    running: float | None = None
    queued: float | None = None
    loaded_models: float | None = None
    weights_mb: float | None = None  # llm_model_memory_bytes over the resident models
    recorded: float | None = None  # llm_requests_total over all labels


@dataclass
class Analytics:
    idle_after: float | None = None  # seconds until no running or queued sequence; None: never
    idle_last: dict[str, float | None] = field(default_factory=dict)
    recorded: float | None = None  # llm_requests_total once idle
    rows: Counter = field(default_factory=Counter)  # (key_name, status, outcome) -> rows
    rows_after_stop: int | None = None
    expected: Counter = field(default_factory=Counter)
    no_answer: Counter = field(default_factory=Counter)  # key_name -> requests without a status


def error_code(text: str) -> str:
    """The error's code or type from an OpenAI- or Anthropic-shaped body, else ''."""
    try:
        err = json.loads(text).get("error") or {}
    except (ValueError, AttributeError):
        return ""
    return str(err.get("code") or err.get("type") or "") if isinstance(err, dict) else ""


# --- the server -----------------------------------------------------------------------------


def key_name(kind: str) -> str:
    return f"soak-{kind}"


def prepare(data_dir: Path, model: Path, env: dict[str, str]) -> dict[str, str]:
    """Database, the three models and one API key per kind of request (returned, kind -> key)."""
    python = str(sb.VENV_BIN / "python")
    imports = [
        [str(model), "--name", CHAT_MODELS[0], "--default"],
        [str(model), "--name", CHAT_MODELS[1]],
        [str(EMBED_MODEL), "--name", EMBED_NAME],
    ]
    sb.run_setup_command([python, "manage.py", "migrate", "-v0"], env)
    for args in imports:
        sb.run_setup_command([python, "manage.py", "import_model", *args, "--backend", "mlx"], env)
    code = (
        "import json\n"
        "from llmservice.models import ApiKey\n"
        "keys = {}\n"
        f"for kind in {list(KINDS)!r}:\n"
        "    row, keys[kind] = ApiKey.generate('soak-' + kind)\n"
        "    if kind == 'limited':\n"
        f"        row.rpm_limit = {LIMITED_RPM}\n"
        "        row.save()\n"
        "print(json.dumps(keys))\n"
    )
    proc = subprocess.run(
        [python, "manage.py", "shell", "--no-imports", "-c", code],
        cwd=sb.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def launch(env: dict[str, str], port: int) -> subprocess.Popen:
    LOG_PATH.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(sb.VENV_BIN / "llm-service"), "serve", "--no-demo", "--no-worker"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with open(LOG_PATH, "wb") as log:
        return subprocess.Popen(
            cmd,
            cwd=sb.REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_ready(proc: subprocess.Popen, url: str) -> None:
    """Until /ready answers 200: up, and the default model loaded (/health answers sooner)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}; see {LOG_PATH}")
        try:
            if httpx.get(f"{url}/ready", timeout=10.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server was not ready within {STARTUP_TIMEOUT:.0f} s; see {LOG_PATH}")


def tree_rss(pid: int) -> tuple[float | None, int]:
    """RSS of the process and its descendants in MB, and how many processes that is."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None, 0
    total, counted = 0, 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
            counted += 1
        except psutil.Error:
            pass
    return total / 1e6, counted


def read_rows(db: Path) -> Counter:
    """Analytics rows by (key_name, status_code, outcome)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        cursor = conn.execute(
            "SELECT key_name, status_code, outcome, COUNT(*) FROM analytics_requestlog "
            "GROUP BY key_name, status_code, outcome"
        )
        return Counter({(k, s, o): n for k, s, o, n in cursor.fetchall()})


def log_findings(path: Path) -> dict[str, Any]:
    """What the server log says about errors, model residency and the stop."""
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = text.splitlines()
    # Our own polling of /ready while the default model loads is logged as an error: not one.
    problems = [
        line
        for line in lines
        if re.search(r"\b(ERROR|CRITICAL)\b|Traceback|terminate called", line)
        and "Service Unavailable: /ready" not in line
    ]
    # django.request logs every 4xx as a warning; the bad inputs make those on purpose.
    warnings = [
        line
        for line in lines
        if " WARNING " in line
        and not re.search(r"django\.request: (Bad Request|Not Found|Unauthorized|Too Many)", line)
    ]
    in_flight = re.findall(r"waiting up to .* for (\d+) request\(s\) in flight", text)
    stamps = re.findall(r"^(\S+ \S+) INFO inference\.residency: loaded \S+ in", text, re.M)
    return {
        "loads": Counter(re.findall(r"loaded (\S+) in [\d.]+ s", text)),
        "load_times": [
            dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() for stamp in stamps
        ],
        "unloads": Counter(re.findall(r"unloading (\S+) to make room", text)),
        "expired": len(re.findall(r"unloading \S+ after", text)),
        "warnings": warnings,
        "problem_lines": problems,
        "in_flight_at_stop": int(in_flight[-1]) if in_flight else None,
        "cancelled_at_stop": "grace period over" in text,
    }


# --- load -----------------------------------------------------------------------------------


class Soak:
    def __init__(self, url: str, keys: dict[str, str], pid: int, args: argparse.Namespace):
        self.url = url
        self.keys = keys
        self.pid = pid
        self.args = args
        self.rng = random.Random(args.seed)
        self.results: list[Result] = []
        self.samples: list[Sample] = []
        self.peak_rss = 0.0
        self.wall_t0 = time.time()
        self.rss_trace: list[tuple[float, float]] = []  # (seconds since the start, MB)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.minutes * 60
        self.client: httpx.AsyncClient
        self.handlers: dict[str, Callable[[Result], Awaitable[None]]] = {
            "chat": self.chat,
            "chat_stream": self.chat_stream,
            "chat_drop": self.chat_drop,
            "chat_tools": self.chat_tools,
            "embeddings": self.embeddings,
            "completions": self.completions,
            "messages": self.messages,
            "bad": self.bad,
            "limited": self.limited,
        }

    def now(self) -> float:
        return time.monotonic() - self.t0

    def headers(self, kind: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[kind]}"}

    def new_client(self) -> httpx.AsyncClient:
        # Generous everywhere: the machine may be shared, and a slow answer is not a failure.
        timeout = httpx.Timeout(self.args.request_timeout, connect=60.0)
        return httpx.AsyncClient(base_url=self.url, timeout=timeout)

    def prompt(self) -> str:
        topic = self.rng.choice(sb.TOPICS)
        return f"Write two sentences about {topic}. Request {self.rng.randrange(10**6)}."

    # --- one request ---

    async def run(self, kind: str, warmup: bool = False) -> Result:
        result = Result(kind=kind, start=self.now(), warmup=warmup)
        try:
            await asyncio.wait_for(self.handlers[kind](result), self.args.request_timeout)
        except TimeoutError:
            result.fail("timeout", f"no complete answer in {self.args.request_timeout:.0f} s")
        except httpx.TransportError as exc:
            result.fail("connection dropped", f"{type(exc).__name__}: {exc}")
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            result.fail("malformed body", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # one odd answer is a finding to report, not the end of the soak
            result.fail("client exception", f"{type(exc).__name__}: {exc}")
        result.end = self.now()
        self.results.append(result)
        return result

    def judge(self, result: Result, response: httpx.Response, text: str) -> bool:
        """Classify by status; True when a 2xx the handler should go on to check."""
        result.status = response.status_code
        status = response.status_code
        code = error_code(text)
        if status == 429 and response.headers.get("retry-after"):
            result.outcome, result.detail = "shed", code
            try:
                result.retry_after = float(response.headers["retry-after"])
            except ValueError:
                result.fail("429 with an unreadable Retry-After", response.headers["retry-after"])
            return False
        if status >= 500:
            result.fail(f"HTTP {status} {code}".strip(), text)
            return False
        if result.kind == "bad":
            if 400 <= status < 500:
                result.outcome, result.detail = "expected_4xx", f"{status} {code}".strip()
            else:
                result.fail(f"bad input answered {status}", text)
            return False
        if status >= 400:
            result.fail(f"HTTP {status} {code}".strip(), text)
            return False
        return True

    async def post(
        self, result: Result, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> dict | None:
        headers = headers or self.headers(result.kind)
        if isinstance(body, bytes):
            headers = {**headers, "Content-Type": "application/json"}
            response = await self.client.post(path, content=body, headers=headers)
        else:
            response = await self.client.post(path, json=body, headers=headers)
        if not self.judge(result, response, response.text):
            return None
        return response.json()

    async def stream(
        self,
        result: Result,
        path: str,
        body: dict,
        headers: dict[str, str],
        on_event: Callable[[str | None, str], bool],
        client: httpx.AsyncClient | None = None,
    ) -> bool:
        """POST and read SSE events, handing each (event name, data) to on_event until it says
        stop (True). Returns whether the stream was read to its end."""
        async with (client or self.client).stream("POST", path, json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                self.judge(result, r, text)
                return False
            self.judge(result, r, "")
            if on_event(None, ""):  # the caller may leave before reading anything
                return False
            name = None
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    if on_event(name, line[5:].strip()):
                        return False
                    name = None
        return True

    # --- the kinds ---

    def chat_body(self, result: Result, max_tokens: int, **extra: Any) -> dict:
        model = self.rng.choice(CHAT_MODELS)
        result.variant = model
        return {
            "model": model,
            "messages": [{"role": "user", "content": self.prompt()}],
            "max_tokens": max_tokens,
            "temperature": self.rng.choice((0, 0.7)),
            **extra,
        }

    async def chat(self, result: Result) -> None:
        data = await self.post(result, "/v1/chat/completions", self.chat_body(result, 48))
        if data is None:
            return
        choice = data["choices"][0]
        if not isinstance(choice["message"].get("content"), str):
            return result.fail("malformed body", f"no message content: {json.dumps(choice)}")
        if choice["finish_reason"] not in ("stop", "length"):
            return result.fail("unexpected finish_reason", str(choice["finish_reason"]))
        result.outcome = "ok"

    async def chat_stream(self, result: Result) -> None:
        body = self.chat_body(result, 64, stream=True, stream_options={"include_usage": True})
        seen = {"done": False, "usage": False, "content": 0}

        def on_event(_: str | None, data: str) -> bool:
            if not data:
                return False
            if data == "[DONE]":
                seen["done"] = True
                return True
            event = json.loads(data)
            if event.get("error"):
                result.stream_error = True
                result.fail("error event in stream", data)
                return True
            seen["usage"] = seen["usage"] or bool(event.get("usage"))
            seen["content"] += sum(
                1 for c in event.get("choices") or [] if (c.get("delta") or {}).get("content")
            )
            return False

        await self.stream(
            result, "/v1/chat/completions", body, self.headers("chat_stream"), on_event
        )
        if result.status != 200 or result.error:
            return
        if not seen["done"]:
            return result.fail("stream ended without [DONE]")
        if not seen["usage"]:
            return result.fail("stream without usage chunk")
        result.outcome = "ok"

    async def chat_drop(self, result: Result) -> None:
        """Leave after k content chunks (0: right after the headers), on a connection of its own so
        that leaving closes it."""
        k = self.rng.randint(0, MAX_DROP_CHUNKS)
        body = self.chat_body(result, 512, stream=True, logit_bias=cb.NO_EOS)
        result.variant += f" k={k}"
        seen = {"content": 0, "done": False}

        def on_event(_: str | None, data: str) -> bool:
            if data == "[DONE]":
                seen["done"] = True
                return True
            if data:
                event = json.loads(data)
                if event.get("error"):
                    result.stream_error = True
                    result.fail("error event in stream", data)
                    return True
                seen["content"] += sum(
                    1 for c in event.get("choices") or [] if (c.get("delta") or {}).get("content")
                )
            return seen["content"] >= k

        async with self.new_client() as client:
            ended = await self.stream(
                result, "/v1/chat/completions", body, self.headers("chat_drop"), on_event, client
            )
        if result.status != 200 or result.error:
            return
        if ended or seen["done"]:
            # The answer ended before the k-th chunk: not a drop, and its row is an ok one.
            result.variant += " (ran to the end)"
            result.outcome = "ok"
            return
        result.outcome = "dropped"

    async def chat_tools(self, result: Result) -> None:
        choice = self.rng.choice(("auto", "auto", "required"))
        parallel = self.rng.choice((None, False))
        city = self.rng.choice(CITIES)
        extra: dict[str, Any] = {"tools": TOOLS, "tool_choice": choice}
        if parallel is not None:
            extra["parallel_tool_calls"] = parallel
        body = self.chat_body(result, 96, **extra)
        body["messages"] = [{"role": "user", "content": f"What is the weather in {city} now?"}]
        result.variant += f" tool_choice={choice}" + (" one call" if parallel is False else "")
        data = await self.post(result, "/v1/chat/completions", body)
        if data is None:
            return
        answer = data["choices"][0]
        calls = answer["message"].get("tool_calls") or []
        for call in calls:
            if not isinstance(json.loads(call["function"]["arguments"]), dict):
                return result.fail("tool call arguments not an object", json.dumps(call))
        # Parallel calls may run into max_tokens after complete ones: "length" is fine then.
        if choice == "required" and (
            not calls or answer["finish_reason"] not in ("tool_calls", "length")
        ):
            return result.fail("tool_choice required without a tool call", json.dumps(answer))
        result.outcome = "ok"

    async def embeddings(self, result: Result) -> None:
        inputs = self.rng.sample(SENTENCES, self.rng.randint(1, 8))
        result.variant = f"{len(inputs)} inputs"
        body = {"model": EMBED_NAME, "input": inputs}
        data = await self.post(result, "/v1/embeddings", body)
        if data is None:
            return
        sizes = {len(item["embedding"]) for item in data["data"]}
        if len(data["data"]) != len(inputs) or len(sizes) != 1:
            return result.fail("malformed body", f"{len(data['data'])} vectors, sizes {sizes}")
        result.outcome = "ok"

    async def completions(self, result: Result) -> None:
        model = self.rng.choice(CHAT_MODELS)
        streamed = self.rng.random() < 0.5
        result.variant = f"{model} {'stream' if streamed else 'full'}"
        body = {
            "model": model,
            "prompt": f"Once upon a time, {self.rng.choice(sb.TOPICS)}",
            "max_tokens": 32,
            "stream": streamed,
        }
        if not streamed:
            data = await self.post(result, "/v1/completions", body)
            if data is None:
                return
            if not isinstance(data["choices"][0]["text"], str):
                return result.fail("malformed body", json.dumps(data)[:300])
            result.outcome = "ok"
            return
        seen = {"done": False}

        def on_event(_: str | None, data: str) -> bool:
            if data == "[DONE]":
                seen["done"] = True
                return True
            if data and json.loads(data).get("error"):
                result.stream_error = True
                result.fail("error event in stream", data)
                return True
            return False

        await self.stream(result, "/v1/completions", body, self.headers("completions"), on_event)
        if result.status != 200 or result.error:
            return
        if not seen["done"]:
            return result.fail("stream ended without [DONE]")
        result.outcome = "ok"

    async def messages(self, result: Result) -> None:
        model = self.rng.choice(CHAT_MODELS)
        streamed = self.rng.random() < 0.5
        result.variant = f"{model} {'stream' if streamed else 'full'}"
        headers = {"x-api-key": self.keys["messages"], "anthropic-version": "2023-06-01"}
        body = {
            "model": model,
            "max_tokens": 48,
            "messages": [{"role": "user", "content": self.prompt()}],
            "stream": streamed,
        }
        if not streamed:
            data = await self.post(result, "/v1/messages", body, headers=headers)
            if data is None:
                return
            if data.get("type") != "message" or not isinstance(data.get("content"), list):
                return result.fail("malformed body", json.dumps(data)[:300])
            result.outcome = "ok"
            return
        seen = {"stop": False}

        def on_event(name: str | None, data: str) -> bool:
            if name == "error":
                result.stream_error = True
                result.fail("error event in stream", data)
                return True
            if name == "message_stop":
                seen["stop"] = True
                return True
            return False

        await self.stream(result, "/v1/messages", body, headers, on_event)
        if result.status != 200 or result.error:
            return
        if not seen["stop"]:
            return result.fail("stream ended without message_stop")
        result.outcome = "ok"

    async def bad(self, result: Result) -> None:
        variant = self.rng.choice(BAD_VARIANTS)
        result.variant = variant
        chat = {
            "model": self.rng.choice(CHAT_MODELS),
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8,
        }
        path, body, headers = "/v1/chat/completions", chat, None
        if variant == "invalid_json":
            body = b'{"model": "soak-a", "messages": [{"role": "user", "content": "Hel'
        elif variant == "unknown_model":
            body = {**chat, "model": "no-such-model"}
        elif variant == "negative_max_tokens":
            body = {**chat, "max_tokens": -1}
        elif variant == "huge_n":
            body = {**chat, "n": 100_000}
        elif variant == "no_messages":
            body = {**chat, "messages": []}
        elif variant == "embedding_model_for_chat":
            body = {**chat, "model": EMBED_NAME}
        elif variant == "required_without_tools":
            body = {**chat, "tool_choice": "required"}
        elif variant == "messages_without_max_tokens":
            path = "/v1/messages"
            body = {"model": chat["model"], "messages": chat["messages"]}
        elif variant == "empty_embedding_input":
            path, body = "/v1/embeddings", {"model": EMBED_NAME, "input": []}
        elif variant == "wrong_key":
            headers = {"Authorization": "Bearer sk-llm-not-a-real-key"}
        await self.post(result, path, body, headers=headers)

    async def limited(self, result: Result) -> None:
        response = await self.client.get("/v1/models", headers=self.headers("limited"))
        if self.judge(result, response, response.text):
            if not isinstance(response.json().get("data"), list):
                return result.fail("malformed body", response.text)
            result.outcome = "ok"

    # --- workers and samples ---

    async def worker(self) -> None:
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
        while time.monotonic() < self.deadline:
            result = await self.run(self.rng.choices(kinds, weights)[0])
            if result.outcome == "shed" and result.kind != "limited":
                # The server asked for a pause (its queue is full): honour it, briefly.
                await asyncio.sleep(min(result.retry_after or 1.0, SHED_PAUSE_CAP))

    async def metrics(self) -> dict[str, float]:
        response = await self.client.get("/metrics", timeout=120.0)
        response.raise_for_status()
        values: dict[str, float] = defaultdict(float)
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                if s.name in ("llm_running_sequences", "llm_queued_requests", "llm_loaded_models"):
                    values[s.name] = s.value
                elif s.name in ("llm_requests_total", "llm_model_memory_bytes"):
                    values[s.name] += s.value
        return values

    async def sample(self, label: str) -> Sample:
        rss, procs = tree_rss(self.pid)
        sample = Sample(label, round(self.now(), 1), rss, procs)
        try:
            m = await self.metrics()
        except (httpx.HTTPError, ValueError) as exc:
            print(f"  /metrics failed at {label}: {exc}", flush=True)
        else:
            sample.running = m.get("llm_running_sequences")
            sample.queued = m.get("llm_queued_requests")
            sample.loaded_models = m.get("llm_loaded_models")
            sample.recorded = m.get("llm_requests_total")
            sample.weights_mb = m.get("llm_model_memory_bytes", 0.0) / 1e6
        if rss is not None:
            self.peak_rss = max(self.peak_rss, rss)
        self.samples.append(sample)
        return sample

    async def sampler(self, stop: asyncio.Event) -> None:
        due = [self.t0 + i * self.args.interval for i in range(1, self.windows() + 1)]
        next_peak = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if due and now >= due[0]:
                due.pop(0)
                s = await self.sample(f"{self.args.interval * (len(self.samples)) / 60:g} min")
                print(self.progress(s), flush=True)
            elif now >= next_peak:
                rss, _ = tree_rss(self.pid)
                if rss is not None:
                    self.peak_rss = max(self.peak_rss, rss)
                    self.rss_trace.append((round(self.now(), 1), round(rss, 1)))
                next_peak = now + PEAK_POLL
            await asyncio.sleep(0.5)

    def windows(self) -> int:
        return max(1, int(round(self.args.minutes * 60 / self.args.interval)))

    def progress(self, s: Sample) -> str:
        done = [r for r in self.results if not r.warmup]
        errors = sum(1 for r in done if r.outcome == "error")
        rss = "-" if s.rss_mb is None else f"{s.rss_mb:.0f} MB"
        return (
            f"  {s.label}: RSS {rss}, {len(done)} requests, {errors} errors, "
            f"running {s.running}, queued {s.queued}, loaded {s.loaded_models}"
        )

    async def soak(self) -> None:
        async with self.new_client() as self.client:
            print("Warm-up: one request of each kind", flush=True)
            self.t0 = time.monotonic()
            for kind in KINDS:
                result = await self.run(kind, warmup=True)
                if result.outcome == "error":
                    print(f"  warm-up {kind}: {result.error}: {result.detail}", flush=True)
            warmup_t0, self.t0 = self.t0, time.monotonic()
            self.wall_t0 = time.time()  # to place the server log's lines in the windows
            self.deadline = self.t0 + self.args.minutes * 60
            for r in self.results:  # warm-up times, relative to the load's start
                r.start -= self.t0 - warmup_t0
                r.end -= self.t0 - warmup_t0
            await self.sample("start")
            print(f"Load: {self.args.workers} workers for {self.args.minutes:g} min", flush=True)
            stop = asyncio.Event()
            sampler = asyncio.create_task(self.sampler(stop))
            workers = [asyncio.create_task(self.worker()) for _ in range(self.args.workers)]
            await asyncio.gather(*workers)
            # The last window's sample, if the last requests ended before it was due.
            while len(self.samples) < self.windows() + 1 and not sampler.done():
                await asyncio.sleep(0.5)
            stop.set()
            await sampler
            await self.sample("drained")

    async def wait_idle(self, analytics: Analytics) -> None:
        """Until /metrics shows no running and no queued sequence."""
        started = time.monotonic()
        async with self.new_client() as self.client:
            while time.monotonic() - started < IDLE_TIMEOUT:
                try:
                    m = await self.metrics()
                except (httpx.HTTPError, ValueError):
                    await asyncio.sleep(1.0)
                    continue
                analytics.idle_last = {
                    "running": m.get("llm_running_sequences"),
                    "queued": m.get("llm_queued_requests"),
                }
                analytics.recorded = m.get("llm_requests_total")
                if not m.get("llm_running_sequences") and not m.get("llm_queued_requests"):
                    analytics.idle_after = time.monotonic() - started
                    return
                await asyncio.sleep(1.0)

    async def final_recorded(self) -> float | None:
        async with self.new_client() as self.client:
            try:
                return (await self.metrics()).get("llm_requests_total")
            except (httpx.HTTPError, ValueError):
                return None


def wait_for_rows(db: Path, recorded: float | None) -> Counter:
    """The rows once their count reaches the server's own count and holds for a few flushes."""
    deadline = time.monotonic() + ANALYTICS_TIMEOUT
    last, since = -1, time.monotonic()
    rows: Counter = Counter()
    while time.monotonic() < deadline:
        try:
            rows = read_rows(db)
        except sqlite3.Error:
            time.sleep(1.0)
            continue
        total = sum(rows.values())
        if total != last:
            last, since = total, time.monotonic()
        caught_up = recorded is None or total >= recorded
        if caught_up and time.monotonic() - since >= SETTLE_SECONDS:
            break
        time.sleep(1.0)
    return rows


def expected_rows(results: list[Result]) -> tuple[Counter, Counter]:
    """The rows the server should have written, by (key_name, status, outcome), from what the
    client saw; and, by key, the requests that got no status (whether they have a row is open)."""
    expected: Counter = Counter()
    unknown: Counter = Counter()
    for r in results:
        name = key_name(r.kind)
        if r.status is None:
            unknown[name] += 1
            continue
        # A wrong key has no owner; the rate limiter's 429 is its key's.
        if r.status == 401:
            name = ""
        if r.outcome == "dropped":
            outcome = "cancelled"
        elif r.status >= 500 or r.stream_error:
            outcome = "server_error"
        elif r.status >= 400:
            outcome = "client_error"
        else:
            outcome = "ok"
        expected[(name, r.status, outcome)] += 1
    return expected, unknown


# --- report ---------------------------------------------------------------------------------


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def fmt_n(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def window_rows(soak: Soak, log: dict[str, Any]) -> list[dict[str, Any]]:
    interval, count = soak.args.interval, soak.windows()

    def window(at: float) -> int:
        return min(count - 1, max(0, int(at // interval)))

    by_window: dict[int, list[Result]] = defaultdict(list)
    for r in soak.results:
        if not r.warmup:
            by_window[window(r.end)].append(r)
    loads = Counter(window(t - soak.wall_t0) for t in log["load_times"] if t >= soak.wall_t0)
    rows = []
    for i in range(count):
        done = by_window[i]
        sample = soak.samples[i + 1] if i + 1 < len(soak.samples) else None
        latencies = [r.latency for r in done if r.kind in LATENCY_KINDS and r.outcome == "ok"]
        rows.append(
            {
                "window": i + 1,
                "rss_mb": sample.rss_mb if sample else None,
                "weights_mb": sample.weights_mb if sample else None,
                "loads": loads.get(i, 0),
                "requests": len(done),
                "errors": sum(1 for r in done if r.outcome == "error"),
                "expected_4xx": sum(1 for r in done if r.outcome == "expected_4xx"),
                "shed": sum(1 for r in done if r.outcome == "shed"),
                "dropped": sum(1 for r in done if r.outcome == "dropped"),
                "chat_n": len(latencies),
                "p50": sb.percentile(latencies, 50),
                "p95": sb.percentile(latencies, 95),
                "p99": sb.percentile(latencies, 99),
                "running": sample.running if sample else None,
                "queued": sample.queued if sample else None,
                "loaded": sample.loaded_models if sample else None,
            }
        )
    return rows


def kind_totals(results: list[Result]) -> list[dict[str, Any]]:
    rows = []
    for kind in KINDS:
        done = [r for r in results if r.kind == kind and not r.warmup]
        count = Counter(r.outcome for r in done)
        ok = [r.latency for r in done if r.outcome == "ok"]
        rows.append(
            {
                "kind": kind,
                "requests": len(done),
                **{k: count.get(k, 0) for k in OUTCOMES},
                "p50": sb.percentile(ok, 50),
                "p95": sb.percentile(ok, 95),
            }
        )
    return rows


def problems_found(soak: Soak, analytics: Analytics, log: dict[str, Any]) -> list[str]:
    problems = []
    errors = [r for r in soak.results if r.outcome == "error"]
    if errors:
        problems.append(f"{len(errors)} requests failed (see Errors)")
    if analytics.idle_after is None:
        problems.append(
            f"the server never reported zero running/queued sequences: {analytics.idle_last}"
        )
    diff = mismatches(analytics)
    if diff:
        problems.append(f"analytics rows differ from the requests on {len(diff)} lines")
    if analytics.recorded is not None and sum(analytics.rows.values()) != analytics.recorded:
        problems.append(
            f"llm_requests_total says {analytics.recorded:g} recorded, the table has "
            f"{sum(analytics.rows.values())} rows"
        )
    if log["problem_lines"]:
        problems.append(f"{len(log['problem_lines'])} error lines in the server log")
    if log["cancelled_at_stop"]:
        problems.append("the stop's grace period ran out and it cancelled requests")
    if log["in_flight_at_stop"]:
        problems.append(
            f"the stop waited for {log['in_flight_at_stop']} request(s) in flight after the "
            "load had ended"
        )
    return problems


def mismatches(analytics: Analytics) -> list[tuple[tuple, int, int]]:
    keys = sorted(set(analytics.expected) | set(analytics.rows), key=str)
    return [
        (k, analytics.expected.get(k, 0), analytics.rows.get(k, 0))
        for k in keys
        if analytics.expected.get(k, 0) != analytics.rows.get(k, 0)
    ]


def report(soak: Soak, analytics: Analytics, log: dict[str, Any], context: dict[str, Any]) -> str:
    sections = [
        head_section(soak, analytics, log, context),
        windows_section(soak, log),
        totals_section(soak),
        errors_section(soak),
        memory_section(soak),
        analytics_section(soak, analytics),
        server_section(log, context),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections)


def head_section(
    soak: Soak, analytics: Analytics, log: dict[str, Any], context: dict[str, Any]
) -> list[str]:
    args, m = soak.args, context["machine"]
    warm = sum(1 for r in soak.results if r.warmup)
    mix = ", ".join(f"{k} {w}" for k, w in WEIGHTS.items())
    lines = [
        "## Soak test: mixed load on one server",
        "",
        f"- Date: {context['date']}",
        f"- Machine: nproc {m['nproc']}, {m['platform']}, {m['cpu']}, Python {m['python']}, "
        f"{m['versions']}; {context['blas']}",
        f"- Models: `{CHAT_MODELS[0]}` (default) and `{CHAT_MODELS[1]}`, both the float32 "
        f"SmolLM2-135M-Instruct folder `{context['model']}`; `{EMBED_NAME}` (all-MiniLM-L6-v2); "
        f"all on mlx, LLM_SERVICE_MAX_LOADED_MODELS={MAX_LOADED_MODELS}",
        f"- Load: {args.minutes:g} min, {args.workers} workers, one request at a time each, kinds "
        f"by weight ({mix}), seed {args.seed}, request timeout {args.request_timeout:.0f} s; "
        f"{warm} warm-up requests (one per kind) before the clock started, left out of the "
        "tables but not of the analytics check",
        f"- Rerun: `.venv/bin/python bench/soak.py {shlex.join(context['argv'])}`",
        "",
    ]
    problems = problems_found(soak, analytics, log)
    if problems:
        return lines + ["**Problems:**", "", *[f"- {p}" for p in problems]]
    return lines + [
        "**No problems:** no errors, the server went idle, and the analytics rows match the "
        "requests."
    ]


def windows_section(soak: Soak, log: dict[str, Any]) -> list[str]:
    lines = [
        f"### By window ({soak.args.interval:g} s each)",
        "",
        "| window | RSS MB | weights MB | model loads | requests | errors | expected 4xx "
        "| shed 429 | dropped on purpose | chat n | chat p50 s | chat p95 s | chat p99 s "
        "| running | queued | loaded models |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in window_rows(soak, log):
        lines.append(
            f"| {w['window']} | {fmt_mb(w['rss_mb'])} | {fmt_mb(w['weights_mb'])} | {w['loads']} "
            f"| {w['requests']} | {w['errors']} | {w['expected_4xx']} | {w['shed']} "
            f"| {w['dropped']} | {w['chat_n']} | {fmt_s(w['p50'])} | {fmt_s(w['p95'])} "
            f"| {fmt_s(w['p99'])} | {fmt_n(w['running'])} | {fmt_n(w['queued'])} "
            f"| {fmt_n(w['loaded'])} |"
        )
    return lines + [
        "",
        "RSS: the server's process tree at the end of the window; weights (the resident models' "
        "llm_model_memory_bytes), running, queued and loaded models: /metrics at the same "
        "moment; model loads: the server log's, in the window. Chat latency: `chat` and "
        "`chat_stream` requests that succeeded, by the window they ended in.",
    ]


def totals_section(soak: Soak) -> list[str]:
    lines = [
        "### Totals by request type",
        "",
        "| type | requests | ok | expected 4xx | shed 429 | dropped on purpose | errors "
        "| ok latency p50 s | p95 s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    totals = kind_totals(soak.results)
    for t in totals:
        lines.append(
            f"| {t['kind']} | {t['requests']} | {t['ok']} | {t['expected_4xx']} | {t['shed']} | "
            f"{t['dropped']} | {t['error']} | {fmt_s(t['p50'])} | {fmt_s(t['p95'])} |"
        )
    sums = {k: sum(t[k] for t in totals) for k in ("requests", *OUTCOMES)}
    lines.append(
        f"| all | {sums['requests']} | {sums['ok']} | {sums['expected_4xx']} | {sums['shed']} | "
        f"{sums['dropped']} | {sums['error']} | | |"
    )
    bad = Counter(
        f"{r.variant} -> {r.detail}"
        for r in soak.results
        if r.outcome == "expected_4xx" and not r.warmup
    )
    if bad:
        answers = "; ".join(f"{v} ({n})" for v, n in sorted(bad.items()))
        lines += ["", f"Bad inputs and their answers: {answers}."]
    return lines


def errors_section(soak: Soak) -> list[str]:
    errors = [r for r in soak.results if r.outcome == "error"]
    if not errors:
        return ["### Errors", "", "None."]
    lines = [
        "### Errors",
        "",
        "| type | error | count | first example (seconds since the start) |",
        "|---|---|---|---|",
    ]
    grouped: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in errors:
        grouped[(r.kind, r.error)].append(r)
    for (kind, error), rs in sorted(grouped.items()):
        first = rs[0]
        example = f"{first.variant} at {first.end:.0f} s: {first.detail}".replace("|", "/")
        lines.append(f"| {kind} | {error} | {len(rs)} | {example[:200]} |")
    return lines


def memory_section(soak: Soak) -> list[str]:
    samples = soak.samples
    start = samples[0] if samples else None
    base = samples[1] if len(samples) > 1 else None
    last = samples[soak.windows()] if len(samples) > soak.windows() else None
    drained = samples[-1] if samples else None
    growth = "-"
    if base and last and base is not last and base.rss_mb and last.rss_mb is not None:
        delta = last.rss_mb - base.rss_mb
        growth = f"{delta:+.0f} MB ({delta / base.rss_mb:+.1%})"
        minutes = (last.at - base.at) / 60
        if minutes > 0:
            growth += f", {delta / minutes:+.1f} MB/min"

    def rss(sample: Sample | None) -> str:
        return fmt_mb(sample.rss_mb if sample else None)

    return [
        "### Memory",
        "",
        f"- RSS of the server's process tree after the warm-up: {rss(start)} MB; end of window "
        f"1: {rss(base)} MB; end of the last window: {rss(last)} MB; once the load had drained: "
        f"{rss(drained)} MB; peak seen (polled every {PEAK_POLL:g} s): "
        f"{fmt_mb(soak.peak_rss)} MB",
        f"- Growth from the end of window 1 to the end of the last: {growth}",
    ]


def analytics_section(soak: Soak, analytics: Analytics) -> list[str]:
    rows = sum(analytics.rows.values())
    answered = sum(analytics.expected.values())
    drops = sum(1 for r in soak.results if r.outcome == "dropped")
    cancelled = sum(n for (_, _, outcome), n in analytics.rows.items() if outcome == "cancelled")
    idle = (
        f"after {analytics.idle_after:.1f} s"
        if analytics.idle_after is not None
        else f"never (last: {analytics.idle_last})"
    )
    lines = [
        "### Analytics rows vs requests",
        "",
        f"- Zero running and queued sequences on /metrics once the load ended: {idle}",
        f"- Requests that got an answer (warm-up included): {answered}; rows in "
        f"analytics_requestlog: {rows}; llm_requests_total: {fmt_n(analytics.recorded)}; "
        f"rows after the server stopped: {fmt_n(analytics.rows_after_stop)}",
        f"- Streams dropped on purpose: {drops}; `cancelled` rows: {cancelled}",
    ]
    if analytics.no_answer:
        lines.append(
            "- Requests without any answer (a row may or may not exist): "
            + ", ".join(f"{k} {n}" for k, n in sorted(analytics.no_answer.items()))
        )
    diff = mismatches(analytics)
    if not diff:
        return lines + ["- Every (key, status, outcome) count matches."]
    lines += [
        "",
        "| key | status | outcome | requests seen by the client | rows |",
        "|---|---|---|---|---|",
    ]
    for (name, status, outcome), want, got in diff:
        lines.append(f"| {name or '(none)'} | {status} | {outcome} | {want} | {got} |")
    return lines


def server_section(log: dict[str, Any], context: dict[str, Any]) -> list[str]:
    loads = ", ".join(f"{k} {n}" for k, n in sorted(log["loads"].items())) or "none"
    unloads = ", ".join(f"{k} {n}" for k, n in sorted(log["unloads"].items())) or "none"
    lines = [
        "### Server",
        "",
        f"- Loads: {loads}; unloads to make room: {unloads}; keep-alive expiries: {log['expired']}",
        f"- Log (`{LOG_PATH.relative_to(sb.REPO)}`): {len(log['problem_lines'])} error lines, "
        f"{len(log['warnings'])} warnings other than django.request's for 4xx answers; requests "
        f"in flight when stopped: {fmt_n(log['in_flight_at_stop'])}; exit code "
        f"{context['exit_code']} after SIGTERM",
    ]
    shown = log["problem_lines"][:10] + log["warnings"][:5]
    if shown:
        lines += ["", "```", *[line[:300] for line in shown], "```"]
    return lines


def dump_json(
    path: str, soak: Soak, analytics: Analytics, log: dict[str, Any], context: dict[str, Any]
) -> None:
    payload = {
        **context,
        "settings": vars(soak.args),
        "samples": [asdict(s) for s in soak.samples],
        "peak_rss_mb": soak.peak_rss,
        "rss_trace": soak.rss_trace,
        "windows": window_rows(soak, log),
        "totals": kind_totals(soak.results),
        "results": [asdict(r) for r in soak.results],
        "analytics": {
            "idle_after": analytics.idle_after,
            "idle_last": analytics.idle_last,
            "recorded": analytics.recorded,
            "rows_after_stop": analytics.rows_after_stop,
            "rows": [[*k, n] for k, n in sorted(analytics.rows.items(), key=str)],
            "expected": [[*k, n] for k, n in sorted(analytics.expected.items(), key=str)],
            "no_answer": dict(analytics.no_answer),
        },
        "log": {**log, "loads": dict(log["loads"]), "unloads": dict(log["unloads"])},
    }
    Path(path).write_text(json.dumps(payload, indent=2))


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="length of the load (default 30)")
    p.add_argument("--workers", type=int, default=4, help="concurrent workers (default 4)")
    p.add_argument(
        "--interval", type=float, default=60.0, help="seconds between samples (default 60)"
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the request mix (default 1)")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="total seconds one request may take before it counts as an error (default 600)",
    )
    p.add_argument(
        "--model-path", help="float32 mlx-lm folder (default: serve_bench's smollm2-f32)"
    )
    p.add_argument("--json", metavar="PATH", help="also dump raw numbers as JSON")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/reliability.md")
    p.add_argument("--keep-data", action="store_true", help="keep the server's data dir")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.workers < 1 or args.interval <= 0:
        p.error("--minutes and --interval must be positive, --workers at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not (EMBED_MODEL / "config.json").is_file():
        raise SystemExit(f"{EMBED_MODEL} is missing: run `make test` first (it fetches the model)")
    model = sb.ensure_model(args.model_path)
    data_dir = Path(tempfile.mkdtemp(prefix="llm-soak-"))
    env, blas = sb.bench_env(data_dir, MAX_BATCH, "mlx")
    env["LLM_SERVICE_MAX_LOADED_MODELS"] = str(MAX_LOADED_MODELS)
    # The checks read the data dir's SQLite file and an open /metrics, and the rate limit lives in
    # the server's memory: an operator's database, Redis or metrics token must not apply here.
    for name in ("DATABASE_URL", "REDIS_URL", "METRICS_TOKEN"):
        env.pop(f"LLM_SERVICE_{name}", None)
    analytics = Analytics()
    soak: Soak | None = None
    exit_code = None
    try:
        print(
            f"Data dir: {data_dir}\nModel: {model}\nSetting up (migrate, imports, keys)", flush=True
        )
        keys = prepare(data_dir, model, env)
        port = sb.free_port()
        url = f"http://127.0.0.1:{port}"
        proc = launch(env, port)
        tree: dict[int, str] = {}
        try:
            print(f"Server pid {proc.pid} on {url}; log {LOG_PATH}", flush=True)
            wait_ready(proc, url)
            tree = sb.process_tree(proc.pid)
            soak = Soak(url, keys, proc.pid, args)
            asyncio.run(soak.soak())
            print("Load over; waiting for the server to go idle", flush=True)
            asyncio.run(soak.wait_idle(analytics))
            print("Waiting for the analytics rows", flush=True)
            analytics.rows = wait_for_rows(data_dir / "db.sqlite3", analytics.recorded)
            # Read again: a request recorded after the idle check would show here, and its row.
            analytics.recorded = asyncio.run(soak.final_recorded()) or analytics.recorded
        finally:
            tree |= sb.process_tree(proc.pid)
            exit_code = sb.stop_process(proc)
            sb.stop_stragglers(tree)
        analytics.rows_after_stop = sum(read_rows(data_dir / "db.sqlite3").values())
    finally:
        if args.keep_data:
            print(f"Data dir kept: {data_dir}", flush=True)
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    assert soak is not None
    analytics.expected, analytics.no_answer = expected_rows(soak.results)
    log = log_findings(LOG_PATH)
    context = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": sb.machine_info(["mlx", "mlx-lm", "mlx-embeddings"]),
        "model": str(model),
        "blas": blas,
        "argv": argv,
        "exit_code": exit_code,
    }
    text = report(soak, analytics, log, context)
    print("\n" + text, flush=True)
    if not args.no_docs:
        sb.write_docs(text, MARK_START, MARK_END, DOCS)
        print(f"\nWrote {DOCS} (between {MARK_START} and {MARK_END})", flush=True)
    if args.json:
        dump_json(args.json, soak, analytics, log, context)
        print(f"Wrote {args.json}", flush=True)
    return 1 if problems_found(soak, analytics, log) else 0


if __name__ == "__main__":
    sys.exit(main())
