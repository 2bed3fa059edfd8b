"""Constrained (response_format json_schema) against free generation, on our server, per backend.

Run it from the repository root on a quiet machine:

    .venv/bin/python bench/constrained_bench.py                 # mlx and vllm, c = 1 and 8
    .venv/bin/python bench/constrained_bench.py --backends mlx  # one backend

For each backend it starts `llm-service serve` with SmolLM2-135M-Instruct float32 (serve_bench's
model) and measures, level by level (c requests in flight, 2 x c per level), free and constrained
chat completions of 128 tokens each, one after the other: the free ones with the end-of-text tokens
pushed down, the constrained ones with a schema whose answers are longer than 128 tokens (an array
of 40 bounded strings), so both run to max_tokens and tok/s compares the same work. Then, in this
process, the time to compile a new schema into its grammar (first, then cached) and to build a
per-request matcher, and the same for twenty tools' tool-call grammar. Results go to docs/benchmarks.md between its constrained_bench markers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import serve_bench as sb  # noqa: E402

MARK_START = "<!-- constrained_bench:start -->"
MARK_END = "<!-- constrained_bench:end -->"
MAX_TOKENS = 128
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-text and end-of-turn tokens
LONG_SCHEMA = {
    "type": "array",
    "items": {"type": "string", "maxLength": 24},
    "minItems": 40,
    "maxItems": 40,
}


def start(backend: str, model: Path, data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    args = argparse.Namespace(max_batch=16, kv_cache_gb=0.5, backend=backend)
    env, _ = sb.bench_env(data_dir, 16, backend)
    python = str(sb.VENV_BIN / "python")
    run = {"env": env, "cwd": sb.REPO, "check": True, "capture_output": True}
    subprocess.run([python, "manage.py", "migrate", "-v0"], **run)
    subprocess.run(
        [python, "manage.py", "import_model", str(model), "--name", "bench", "--default"]
        + ["--backend", backend],
        **run,
    )
    if backend == "vllm":
        fields = "; ".join(f"r.{k}={v!r}" for k, v in sb.vllm_settings(args).items())
        code = (
            "from models_app.models import LLMModel; "
            f"r=LLMModel.objects.get(name='bench'); {fields}; r.full_clean(); r.save()"
        )
        subprocess.run([python, "manage.py", "shell", "--no-imports", "-c", code], **run)
    return launch(backend, env, log)


def launch(backend: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """`llm-service serve` on a free port with `env`, once /ready answers."""
    port = sb.free_port()
    proc = subprocess.Popen(
        [str(sb.VENV_BIN / "llm-service"), "serve", "--host", "127.0.0.1", "--port", str(port)]
        + ["--no-demo", "--no-worker"],
        env=env,
        cwd=sb.REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + sb.STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{backend} server exited; see {log}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"{backend} server did not get ready; see {log}")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def body(prompt: str, constrained: bool) -> dict:
    request = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    if constrained:
        request["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "list", "schema": LONG_SCHEMA},
        }
    else:
        request["logit_bias"] = NO_EOS
    return request


async def level(url: str, c: int, constrained: bool) -> tuple[float, int, int]:
    """tok/s over 2 x c requests with c in flight; completion tokens; answers cut at max_tokens."""
    prompts = [f"List forty short names of things, set {i}." for i in range(2 * c)]
    headers = {"Authorization": f"Bearer {sb.API_KEY}"}
    tokens, lengths = 0, 0
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        queue = list(prompts)

        async def worker() -> None:
            nonlocal tokens, lengths
            while queue:
                prompt = queue.pop()
                reply = await client.post("/v1/chat/completions", json=body(prompt, constrained))
                reply.raise_for_status()
                data = reply.json()
                tokens += data["usage"]["completion_tokens"]
                lengths += data["choices"][0]["finish_reason"] == "length"

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.monotonic() - started
    return tokens / wall, tokens, lengths


def timed(action, repeat: int = 1) -> tuple[object, float]:
    """`action()`'s result and its seconds (the mean of `repeat` runs)."""
    started = time.perf_counter()
    for _ in range(repeat):
        result = action()
    return result, (time.perf_counter() - started) / repeat


def compile_times() -> dict[str, float]:
    from transformers import AutoTokenizer

    from inference import constraints, tools

    tokenizer = AutoTokenizer.from_pretrained(str(sb.ensure_model(None)))
    ll_tokenizer, per_model = timed(lambda: constraints.tokenizer_for(tokenizer, frozenset([2])))
    times = {"per_model": per_model}
    # A new JSON schema; and twenty tools in the Hermes format, tool_choice auto.
    schema = {**LONG_SCHEMA, "description": f"fresh {time.time_ns()}"}
    offered = [
        tools.ToolDef(f"tool_{i}_{time.time_ns()}", "A tool.", LONG_SCHEMA) for i in range(20)
    ]
    lark = tools.tool_grammar(tools.get_format("hermes"), offered, required=False, parallel=True)
    for prefix, compile_ in (
        ("", lambda: constraints.json_constraint(schema)),
        ("tools_", lambda: constraints.lark_constraint(lark)),
    ):
        compiled, times[prefix + "first"] = timed(compile_)
        _, times[prefix + "cached"] = timed(compile_)
        _, times[prefix + "per_request"] = timed(
            lambda c=compiled: constraints.GrammarProcessor(ll_tokenizer, c), repeat=20
        )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="mlx,vllm")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    model = sb.ensure_model(None)
    sb.LOG_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    for backend in args.backends.split(","):
        data_dir = Path(tempfile.mkdtemp(prefix=f"constrained-{backend}-"))
        proc, url = start(backend, model, data_dir, sb.LOG_DIR / f"constrained-{backend}.log")
        try:
            asyncio.run(level(url, 1, True))  # warm-up: the grammar path's first use
            for c in (int(x) for x in args.concurrency.split(",")):
                free = asyncio.run(level(url, c, False))
                constrained = asyncio.run(level(url, c, True))
                rows.append((backend, c, free, constrained))
                print(
                    f"{backend} c={c}: free {free[0]:.1f} tok/s, constrained {constrained[0]:.1f} "
                    f"tok/s ({constrained[0] / free[0]:.2f}x)",
                    flush=True,
                )
        finally:
            stop(proc)
            shutil.rmtree(data_dir, ignore_errors=True)
    times = compile_times()
    lines = [
        "## Constrained decoding: response_format json_schema against free generation",
        "",
        f"- Date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; model SmolLM2-135M-Instruct "
        f"float32; {MAX_TOKENS} tokens a request, temperature 0, 2 x c requests per level, c in "
        "flight; constrained answers follow an array of 40 strings of at most 24 characters (longer "
        "than the budget), free ones have the end-of-text tokens pushed down: both run to max_tokens.",
        "- Rerun: `.venv/bin/python bench/constrained_bench.py`",
        "",
        "| backend | c | free tok/s | constrained tok/s | ratio | cut at max_tokens (free, constrained) |",
        "|---|---|---|---|---|---|",
    ]
    for backend, c, free, constrained in rows:
        lines.append(
            f"| {backend} | {c} | {free[0]:.1f} | {constrained[0]:.1f} | "
            f"{constrained[0] / free[0]:.2f}x | {free[2]}/{2 * c}, {constrained[2]}/{2 * c} |"
        )
    lines += [
        "",
        f"Grammar for a new schema: {times['first'] * 1000:.2f} ms the first time, "
        f"{times['cached'] * 1e6:.1f} us cached (per schema text). llguidance's tokenizer: "
        f"{times['per_model'] * 1000:.0f} ms once per loaded model. A request's matcher: "
        f"{times['per_request'] * 1000:.2f} ms. Twenty tools (Hermes format, tool_choice auto): "
        f"{times['tools_first'] * 1000:.2f} ms the first time, "
        f"{times['tools_cached'] * 1e6:.1f} us cached, a request's matcher "
        f"{times['tools_per_request'] * 1000:.2f} ms (built on the caller's thread, not the step "
        "loop's).",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_docs:
        sb.write_docs(section, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
