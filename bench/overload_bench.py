"""Overload: what admitted requests see when ten times the admission queue arrives at once.

Run it from the repository root (after `make setup`):

    .venv/bin/python bench/overload_bench.py            # writes docs/reliability.md
    .venv/bin/python bench/overload_bench.py --no-docs

One `llm-service serve` on the mlx backend with SmolLM2-135M-Instruct (serve_bench's float32 folder),
`LLM_SERVICE_MAX_BATCH_SIZE` = B and `LLM_SERVICE_MAX_QUEUE` = Q. Levels, in turn and `--rounds` times:
a single request (idle), B + Q streamed chats at once (everything admitted: the full queue), and
10 x (B + Q) at once (ten times that). For each level: the statuses, whether every refusal carried
Retry-After, TTFT p50 and p99 of the admitted requests, and the TTFT of one request sent right after
the burst ended (recovery). The figures are ratios against the full-queue level of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import constrained_bench as cb  # noqa: E402
import serve_bench as sb  # noqa: E402

MARK_START = "<!-- overload_bench:start -->"
MARK_END = "<!-- overload_bench:end -->"
DOCS = sb.REPO / "docs" / "reliability.md"


async def one(client: httpx.AsyncClient, i: int) -> tuple[int, bool, float | None]:
    """(status, Retry-After present, TTFT) of one streamed chat."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": f"Tell me fact number {i} about rivers."}],
        "max_tokens": 32,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        ttft = None
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: ") and '"content":"' in line:
                ttft = time.perf_counter() - started
        return response.status_code, "retry-after" in response.headers, ttft


async def burst(url: str, count: int) -> dict:
    headers = {"Authorization": f"Bearer {sb.API_KEY}"}
    limits = httpx.Limits(max_connections=count + 1, max_keepalive_connections=count + 1)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=600, limits=limits
    ) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(count)))
        _, _, recovery = await one(client, count)
    admitted = [t for status, _, t in results if status == 200 and t is not None]
    return {
        "statuses": Counter(status for status, _, _ in results),
        "refusals_with_retry_after": all(r for s, r, _ in results if s != 200),
        "ttft": admitted,
        "recovery": recovery,
    }


def table(levels: dict[str, list[dict]]) -> str:
    base = sb.percentile([t for r in levels["full queue"] for t in r["ttft"]], 99)
    lines = [
        "| level | requests at once | statuses | refusals with Retry-After | admitted TTFT p50 | "
        "p99 | p99 / full queue | next request's TTFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rounds in levels.items():
        ttft = [t for r in rounds for t in r["ttft"]]
        statuses = sum((r["statuses"] for r in rounds), Counter())
        count = sum(statuses.values()) // len(rounds)
        p50, p99 = sb.percentile(ttft, 50), sb.percentile(ttft, 99)
        recovery = max(r["recovery"] for r in rounds)
        shown = ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items()))
        lines.append(
            f"| {name} | {count} | {shown} | "
            f"{'yes' if all(r['refusals_with_retry_after'] for r in rounds) else 'NO'} | "
            f"{p50:.2f} s | {p99:.2f} s | {p99 / base:.2f}x | {recovery:.2f} s (worst) |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="LLM_SERVICE_MAX_BATCH_SIZE (default 8)")
    p.add_argument("--queue", type=int, default=8, help="LLM_SERVICE_MAX_QUEUE (default 8)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()

    model = sb.ensure_model(None)
    data_dir = Path(tempfile.mkdtemp(prefix="llm-overload-"))
    log = sb.REPO / ".cache" / "bench" / "logs" / "overload.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env, _ = sb.bench_env(data_dir, args.batch, "mlx")
    env["LLM_SERVICE_MAX_QUEUE"] = str(args.queue)
    python = str(sb.VENV_BIN / "python")
    run = {"env": env, "cwd": sb.REPO, "check": True, "capture_output": True}
    subprocess.run([python, "manage.py", "migrate", "-v0"], **run)
    subprocess.run(
        [python, "manage.py", "import_model", str(model), "--name", "bench", "--default"], **run
    )
    proc, url = cb.launch("mlx", env, log)
    full = args.batch + args.queue
    levels: dict[str, list[dict]] = {"idle": [], "full queue": [], "10x the queue": []}
    try:
        asyncio.run(burst(url, 1))  # warm-up
        for _ in range(args.rounds):
            for name, count in (("idle", 1), ("full queue", full), ("10x the queue", 10 * full)):
                levels[name].append(asyncio.run(burst(url, count)))
    finally:
        cb.stop(proc)
        shutil.rmtree(data_dir, ignore_errors=True)
    section = (
        f"Measured {dt.date.today()} by `bench/overload_bench.py` on {sb.machine_info([])['cpu']}: "
        f"SmolLM2-135M-Instruct on mlx, batch {args.batch}, queue {args.queue}, streamed chats of "
        f"32 tokens, {args.rounds} rounds per level.\n\n" + table(levels)
    )
    print(section)
    if not args.no_docs:
        sb.write_docs(section, MARK_START, MARK_END, DOCS)


if __name__ == "__main__":
    main()
